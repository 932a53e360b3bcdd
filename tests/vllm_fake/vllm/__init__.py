"""A stand-in for vllm 0.33 that records every call and models the behaviour the adapter relies on.

Each call is checked against the real signatures (vllm_fake.check_call) and appended to CALLS.
What it models, as read from vLLM 0.33.0's source:
- sleep(level=2) discards the weights and the KV cache and pauses the scheduler;
  wake_up(tags) wakes those tags, and the scheduler resumes only once nothing is asleep, so
  generate refuses to run while any tag sleeps, and refuses weights not rewritten since a
  level-2 sleep (vLLM would compute with garbage);
- apply_model(func) runs func on the worker's model and returns [result] (one worker per
  engine under external_launcher); load_weights writes (name, tensor) pairs and returns the
  names it wrote, and raises KeyError for an unknown name;
- generate returns one RequestOutput per prompt, samples drawn from a generator seeded by
  SamplingParams.seed, EOS checked before the length limit, stop strings detected on the
  detokenised text and kept in it only with include_stop_str_in_output; log-probs as
  list[dict[token id, Logprob]], each dict holding the sampled token and a decoy;
- prompt_logprobs: [None, {token: Logprob}, ...] over the prompt.
Tests set TOKENIZER (used to detokenise), PARAMETERS (the model's parameter names) and may
set SCRIPT(prompt_ids, tokens_so_far, rng) -> next token.
"""

import dataclasses
import os
import random

import vllm_fake

__version__ = "0.33.0"
SNAPSHOT = vllm_fake.load_snapshot()
CALLS = []  # Call per API call, and the tests' own events (e.g. torch.cuda.empty_cache)
OUTPUTS = []  # every RequestOutput generate returned
TOKENIZER = None
PARAMETERS = ["model.embed_tokens.weight"]
SCRIPT = None


@dataclasses.dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict


def _record(name, args, kwargs):
    CALLS.append(Call(name, args, dict(kwargs)))
    return vllm_fake.check_call(SNAPSHOT, name, args, kwargs)


def _strict_class(name, attributes):
    """A class with exactly these attributes, set by keyword: reading any other raises AttributeError."""

    def __init__(self, **values):
        for attribute in attributes:
            setattr(self, attribute, values.pop(attribute, None))
        if values:
            raise TypeError(f"{name} has no attributes {sorted(values)}")

    return type(name, (), {"__slots__": tuple(attributes), "__init__": __init__})


CompletionOutput = _strict_class("CompletionOutput", [f["name"] for f in SNAPSHOT["fields"]["CompletionOutput"]])
RequestOutput = _strict_class("RequestOutput", [p["name"] for p in SNAPSHOT["methods"]["RequestOutput.__init__"]
                                                if p["kind"] != "VAR_KEYWORD" and p["name"] != "self"])
Logprob = dataclasses.make_dataclass("Logprob", [(f["name"], object, dataclasses.field(default=None))
                                                 for f in SNAPSHOT["fields"]["Logprob"]])
_SAMPLING_DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, min_p=0.0, max_tokens=16, skip_special_tokens=True,
                          include_stop_str_in_output=False, ignore_eos=False)


class SamplingParams:
    def __init__(self, *args, **kwargs):
        _record("SamplingParams", args, kwargs)
        for field in vllm_fake.fields(SNAPSHOT, "SamplingParams"):
            setattr(self, field["name"], _SAMPLING_DEFAULTS.get(field["name"]))
        for name, value in kwargs.items():
            setattr(self, name, value)


def prompt_logprob(prefix, token):
    """The fake model's log-prob of `token` after `prefix`: a fixed function the tests can recompute."""
    return -((token * 7 + len(prefix) * 3 + sum(prefix)) % 17) / 8.0


class FakeModel:
    """The worker's model: which parameters hold real values, and their fingerprint."""

    def __init__(self, names):
        self.names, self.values = list(names), {name: 0.0 for name in names}
        self.written = set(self.names)  # LLM() loaded them from the model path

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name not in self.values:
                raise KeyError(name)
            self.values[name] = float(tensor.double().sum())
            loaded.add(name)
        self.written |= loaded
        return loaded

    def named_parameters(self):
        return [(name, self.values[name]) for name in self.names]

    def fingerprint(self):
        return round(sum(self.values.values()), 6)


class LLM:
    def __init__(self, *args, **kwargs):
        arguments = _record("LLM.__init__", args, kwargs)
        self.options = {**arguments, **arguments.pop("kwargs", {})}
        if self.options.get("distributed_executor_backend") == "external_launcher":
            # ExecutorWithExternalLauncher reads these without a default.
            self.launcher = {name: os.environ[name] for name in ("RANK", "LOCAL_RANK")}
        self.model, self.asleep, self.rng = FakeModel(PARAMETERS), set(), random.Random(0)

    def sleep(self, *args, **kwargs):
        level = _record("LLM.sleep", args, kwargs).get("level", 1)
        if not self.options.get("enable_sleep_mode"):
            raise RuntimeError("Sleep mode is not enabled")
        if level >= 1:
            self.asleep = {"weights", "kv_cache"}
        if level == 2:
            self.model.written = set()

    def wake_up(self, *args, **kwargs):
        tags = _record("LLM.wake_up", args, kwargs).get("tags")
        self.asleep -= set(tags or self.asleep)
        return not self.asleep

    def reset_prefix_cache(self, *args, **kwargs):
        _record("LLM.reset_prefix_cache", args, kwargs)
        return True

    def apply_model(self, *args, **kwargs):
        func = _record("LLM.apply_model", args, kwargs)["func"]
        if "weights" in self.asleep:
            raise RuntimeError("apply_model while the weights sleep: their memory is not mapped")
        return [func(self.model)]

    def collective_rpc(self, *args, **kwargs):
        _record("LLM.collective_rpc", args, kwargs)
        raise NotImplementedError("the fake has no worker methods")

    def generate(self, *args, **kwargs):
        arguments = _record("LLM.generate", args, kwargs)
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} sleep: the scheduler is paused")
        if self.model.written != set(self.model.names):
            raise RuntimeError("generate on weights not rewritten since a level-2 sleep: garbage")
        prompts, params = arguments["prompts"], arguments["sampling_params"]
        params = params if isinstance(params, list) else [params] * len(prompts)
        outputs = [self._request(str(index), prompt, p) for index, (prompt, p) in enumerate(zip(prompts, params))]
        OUTPUTS.extend(outputs)
        return outputs

    def _request(self, request_id, prompt, params):
        ids = prompt["prompt_token_ids"]
        rng = self.rng if params.seed is None else random.Random(f"{params.seed}|{ids}|{self.model.fingerprint()}")
        tokens, positions, finish, text = [], [], "length", ""
        for _ in range(params.max_tokens):
            token = SCRIPT(ids, tokens, rng) if SCRIPT else _draw(rng)
            tokens.append(token)
            decoy = 0 if token else 1
            positions.append({decoy: Logprob(logprob=0.0, rank=1), token: Logprob(logprob=-3 * rng.random(), rank=2)})
            text = TOKENIZER.decode(tokens, skip_special_tokens=params.skip_special_tokens)
            if token == TOKENIZER.eos_token_id and not params.ignore_eos:
                finish = "stop"
                break
            hits = [(text.index(stop) + len(stop), stop) for stop in params.stop or [] if stop in text]
            if hits:
                end, stop = min(hits)
                text, finish = text[: end if params.include_stop_str_in_output else end - len(stop)], "stop"
                break
        sample = CompletionOutput(index=0, text=text, token_ids=tokens, finish_reason=finish,
                                  logprobs=positions if params.logprobs is not None else None)
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{ids[i]: Logprob(logprob=prompt_logprob(ids[:i], ids[i]))}
                                        for i in range(1, len(ids))]
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=ids, outputs=[sample],
                             prompt_logprobs=prompt_logprobs, finished=True)


def _draw(rng):
    """A token of the tests' tokenizer: end-of-sequence one time in ten, never padding or unknown."""
    return TOKENIZER.eos_token_id if rng.random() < 0.1 else rng.randrange(4, len(TOKENIZER))
