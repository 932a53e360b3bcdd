"""A stand-in for vllm 0.33 that records every call and models the behaviour the adapter relies on.

Each call is checked against the real signatures (vllm_fake.check_call) and appended to CALLS.
What it models, as read from vLLM 0.33.0's source and measured on its CPU build:
- LLM(enable_sleep_mode=True) is refused off CUDA (set CUDA = True for a GPU); load_format
  "dummy" starts on random weights, anything else on the checkpoint's;
- sleep(level=2) discards the weights and the KV cache, clears the prefix cache and pauses the
  scheduler; wake_up(tags) wakes those tags, and the scheduler resumes only once nothing is
  asleep, so generate refuses to run while any tag sleeps; weights woken after a level-2 sleep
  hold uninitialised memory until they are reloaded, and generate refuses them;
- collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})
  reads the iterator one pair at a time (WorkerModel.received), is refused while the weights
  sleep, and raises KeyError for an unknown name. A layer that received all its tensors holds
  them; one that received only some holds uninitialised memory; one that received none (a tied
  head not sent, say) keeps what it held;
- the prefix cache serves a prompt the blocks computed with the weights of its first request
  until reset_prefix_cache (or a sleep) clears it;
- generate returns one RequestOutput per prompt, samples drawn from a generator seeded by
  SamplingParams.seed and the weights, EOS checked before the length limit, stop strings
  detected on the detokenised text and kept in it only with include_stop_str_in_output;
  log-probs as list[dict[token id, Logprob]], each dict holding the sampled token and a decoy.
Tests set CUDA, TOKENIZER (used to detokenise), PARAMETERS (the model's state-dict names) and
may set SCRIPT(prompt_ids, tokens_so_far, rng) -> next token.
"""

import dataclasses
import os
import random

import vllm_fake

__version__ = "0.33.0"
CUDA = False  # the platform: sleep mode exists only on CUDA
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


# vLLM's Llama stacks these checkpoint projections into one module each.
_STACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj"}


def layer_of(name):
    """The vLLM module a checkpoint tensor loads into."""
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{_STACKED[leaf]}" if leaf in _STACKED else module


class WorkerModel:
    """The worker's model: each parameter's fingerprint (the sum of the tensor written into it), None
    where it holds uninitialised memory."""

    def __init__(self, names, load_format):
        self.names = list(names)
        # The fake reads no checkpoint: its values are 0.0, dummy weights random.
        self.values = {name: random.Random(name).random() if load_format == "dummy" else 0.0 for name in self.names}
        self.received = []  # (name, tensor) in the order reload_weights read them, over every reload

    def reload(self, weights):
        layers = {}
        for name, tensor in weights:
            if name not in self.values:
                raise KeyError(name)
            self.received.append((name, tensor))
            layers.setdefault(layer_of(name), {})[name] = float(tensor.double().sum())
        for layer, written in layers.items():
            members = [name for name in self.names if layer_of(name) == layer]
            for name in members:
                self.values[name] = written[name] if len(written) == len(members) else None

    def uninitialised(self):
        return [name for name in self.names if self.values[name] is None]

    def fingerprint(self):
        return round(sum(self.values.values()), 6)


class LLM:
    def __init__(self, *args, **kwargs):
        arguments = _record("LLM.__init__", args, kwargs)
        self.options = {**arguments, **arguments.pop("kwargs", {})}
        if self.options.get("enable_sleep_mode") and not CUDA:
            raise ValueError("Sleep mode is not supported on current platform.")  # ModelConfig's check
        if self.options.get("distributed_executor_backend") == "external_launcher":
            # ExecutorWithExternalLauncher reads these without a default.
            self.launcher = {name: os.environ[name] for name in ("RANK", "LOCAL_RANK")}
        self.model = WorkerModel(PARAMETERS, self.options.get("load_format", "auto"))
        self.asleep, self.rng, self.prefix_cache = set(), random.Random(0), {}

    def sleep(self, *args, **kwargs):
        level = _record("LLM.sleep", args, kwargs).get("level", 1)
        if not self.options.get("enable_sleep_mode"):
            raise RuntimeError("Sleep mode is not enabled")
        if level == 0:
            raise NotImplementedError("the fake models sleep levels 1 and 2")
        self.asleep = {"weights", "kv_cache"}
        self.prefix_cache.clear()
        if level == 2:
            self.model.values = dict.fromkeys(self.model.names)

    def wake_up(self, *args, **kwargs):
        tags = _record("LLM.wake_up", args, kwargs).get("tags")
        self.asleep -= set(tags or self.asleep)
        return not self.asleep

    def reset_prefix_cache(self, *args, **kwargs):
        _record("LLM.reset_prefix_cache", args, kwargs)
        self.prefix_cache.clear()
        return True

    def collective_rpc(self, *args, **kwargs):
        arguments = _record("LLM.collective_rpc", args, kwargs)
        if arguments["method"] != "reload_weights":
            raise NotImplementedError(f"the fake's worker has no {arguments['method']!r}")
        if "weights" in self.asleep:
            raise RuntimeError("reload_weights while the weights sleep: their memory is not mapped")
        return [self._reload_weights(*arguments.get("args", ()), **(arguments.get("kwargs") or {}))]

    def _reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        if weights_iterator is None or not is_checkpoint_format:
            raise NotImplementedError("the fake reloads checkpoint-format weights from an iterator only")
        self.model.reload(weights_iterator)

    def generate(self, *args, **kwargs):
        arguments = _record("LLM.generate", args, kwargs)
        if self.asleep:
            raise RuntimeError(f"generate while {sorted(self.asleep)} sleep: the scheduler is paused")
        if self.model.uninitialised():
            raise RuntimeError(f"generate on uninitialised weights {self.model.uninitialised()}: garbage")
        prompts, params = arguments["prompts"], arguments["sampling_params"]
        params = params if isinstance(params, list) else [params] * len(prompts)
        outputs = [self._request(str(index), prompt, p) for index, (prompt, p) in enumerate(zip(prompts, params))]
        OUTPUTS.extend(outputs)
        return outputs

    def _request(self, request_id, prompt, params):
        ids = prompt["prompt_token_ids"]
        weights = self.model.fingerprint()
        if self.options.get("enable_prefix_caching"):
            weights = self.prefix_cache.setdefault(tuple(ids), weights)
        rng = self.rng if params.seed is None else random.Random(f"{params.seed}|{ids}|{weights}")
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
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=ids, outputs=[sample],
                             prompt_logprobs=None, finished=True)


def _draw(rng):
    """A token of the tests' tokenizer: end-of-sequence one time in ten, never padding or unknown."""
    return TOKENIZER.eos_token_id if rng.random() < 0.1 else rng.randrange(4, len(TOKENIZER))
