"""Batched sampling through transformers' generate, on the training model itself (whole or FSDP-sharded)."""

import dataclasses
import math

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..parallel import all_gather_objects, all_reduce_max, is_distributed
from .base import Completion, RolloutEngine, eval_sampling, register_engine
from .keyed_sampling import KeyedSampler, sequence_keys
from .shares import rank_share


class StopOnStrings(StoppingCriteria):
    """Ends each row once its newest tokens spell one of the stop strings.

    Only a short tail is decoded per step: a stop string can span at most as many tokens as it
    has characters, plus a few that decode to nothing.
    """

    def __init__(self, tokenizer, stops, prompt_length):
        super().__init__()
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length
        self.window = max(len(stop) for stop in self.stops) + 4

    def __call__(self, input_ids, scores, **kwargs):
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=False)
        return torch.tensor([any(stop in tail for stop in self.stops) for tail in tails], device=input_ids.device)


def rows_per_generate_call(max_batch_tokens, longest_prompt, max_new_tokens):
    """Rows one generate call may hold: its KV cache, rows x (longest prompt + max_new_tokens), at
    most max_batch_tokens (None: no bound), and at least one row."""
    if max_batch_tokens is None:
        return None
    return max(1, max_batch_tokens // (longest_prompt + max_new_tokens))


@register_engine("hf")
class HFRolloutEngine(RolloutEngine):
    """max_batch_tokens: KV-cache tokens per generate call at most, rows x (longest prompt +
    max_new_tokens); a rollout needing more is sampled in several calls of fewer rows."""

    def __init__(self, root_module, tokenizer, device, max_batch_tokens=None):
        self.root, self.tokenizer, self.device = root_module, tokenizer, device
        self.max_batch_tokens = max_batch_tokens

    holds_weights = False  # generation runs on the policy's own parameters: nothing to sync

    @classmethod
    def for_training(cls, trainer, config):
        return cls(trainer.module, trainer.tokenizer, trainer.device,
                   max_batch_tokens=config.grpo.engine.max_batch_tokens)

    @classmethod
    def sample_benchmark(cls, config, problems, tokenizer, device, rank, world_size):
        """Every problem's completions on rank 0 (None elsewhere); each rank samples problems rank, rank + N, ...

        Completions are keyed by the problem's index in the benchmark, so N ranks sample what one
        process would.
        """
        from ..model import load_causal_lm

        settings = config.eval
        causal_lm = load_causal_lm(config.model, device).eval()
        sampling = eval_sampling(settings)
        share = list(rank_share(len(problems), rank, world_size))
        prompts = [problems[index][0] for index in share]
        calls = plan_generate_calls([len(p) for p in prompts], settings.samples, sampling.max_new_tokens,
                                    settings.batch_prompts, settings.max_batch_tokens)
        completions = sample_completions(causal_lm, tokenizer, prompts, sampling, settings.batch_prompts,
                                         progress=rank == 0, device=device, seed=config.train.seed, prompt_keys=share,
                                         max_batch_tokens=settings.max_batch_tokens)
        gathered = all_gather_objects((dict(zip(share, completions)), len(calls)))
        if rank != 0:
            return None, None
        merged = {index: value for part, _ in gathered for index, value in part.items()}
        return [merged[index] for index in range(len(problems))], sum(count for _, count in gathered)

    @classmethod
    def plan_rollout(cls, config, architecture, policy, resident, gpu_bytes, shape):
        grpo = config.grpo
        items = dict(resident)
        # HF generate under FSDP: the root's own parameters stay gathered (embeddings, head), one layer
        # is gathered at a time plus the next one prefetched, and each call's KV cache grows to full
        # length; each decoding step's cache update copies one layer's cache.
        layer_parameters = sum(p.numel() for p in policy.causal_lm.model.layers[0].parameters())
        all_parameters = sum(p.numel() for p in policy.parameters())
        root_parameters = all_parameters - layer_parameters * len(policy.causal_lm.model.layers)
        items["parameters"] = items.get("parameters", 0) + (root_parameters + 2 * layer_parameters) * 2
        rows_per_call = rows_per_generate_call(grpo.engine.max_batch_tokens, shape.prompt_tokens,
                                               grpo.sampling.max_new_tokens)
        rows = min(shape.sequences, rows_per_call or shape.sequences)
        items["KV cache"] = generate_cache_bytes(architecture, rows, shape.sequence_tokens)
        calls = math.ceil(shape.sequences / rows)
        return [(f"rollout (HF generate, {calls} calls of {rows} x {shape.sequence_tokens} tokens)", items)], []

    @classmethod
    def plan_evaluation(cls, config, architecture, gpu_bytes, parameters, prompt_tokens):
        """Every GPU holds the bf16 model whole and one generate call's KV cache."""
        settings = config.eval
        sequence = prompt_tokens + max(settings.budgets)
        calls = plan_generate_calls([prompt_tokens] * settings.batch_prompts, settings.samples, max(settings.budgets),
                                    settings.batch_prompts, settings.max_batch_tokens)
        rows = max(len(positions) * (end - first) for positions, first, end in calls)
        items = {"parameters": parameters * 2, "KV cache": generate_cache_bytes(architecture, rows, sequence)}
        note = (f"one generate call's KV cache: {rows} rows x {sequence} tokens ({prompt_tokens}-token prompts; "
                f"eval.max_batch_tokens={settings.max_batch_tokens})")
        return items, note

    def _stop_end(self, tokens, stops):
        """Tokens up to and including the one that completes the first stop string, or None."""
        window = max(len(stop) for stop in stops) + 4
        for end in range(1, len(tokens) + 1):
            tail = self.tokenizer.decode(tokens[max(0, end - window) : end], skip_special_tokens=False)
            if any(stop in tail for stop in stops):
                return end
        return None

    def rows_per_call(self, prompt_ids, settings):
        """Rows one generate call may hold under max_batch_tokens (None: all of them).

        The longest prompt is taken over every rank, so that each rank makes the same number of
        calls: under FSDP every call's forward passes are collectives.
        """
        if self.max_batch_tokens is None:
            return None
        longest = max(len(ids) for ids in prompt_ids)
        if is_distributed():
            longest = all_reduce_max(longest)
        return rows_per_generate_call(self.max_batch_tokens, longest, settings.max_new_tokens)

    def generate(self, prompt_ids, settings, row_keys=None):
        """settings.n completions of each prompt, in prompt order.

        row_keys: one int64 key per returned row (see keyed_sampling.sequence_keys); with them the
        samples depend on the keys alone, not on the batch or the process's random state, so
        splitting the rows across calls changes no sample.
        """
        rows = len(prompt_ids) * settings.n
        if row_keys is None:  # unkeyed: fresh keys from the process's random state
            row_keys = torch.randint(-(2**62), 2**62, (rows,))
        per_call = self.rows_per_call(prompt_ids, settings)
        if per_call is None or per_call >= rows:
            return self._generate_call(prompt_ids, settings, row_keys)
        completions, single = [], dataclasses.replace(settings, n=1)
        for start in range(0, rows, per_call):
            end = min(start + per_call, rows)
            call_prompts = [prompt_ids[row // settings.n] for row in range(start, end)]
            for completion in self._generate_call(call_prompts, single, row_keys[start:end]):
                row = start + completion.prompt_index
                completions.append(dataclasses.replace(completion, prompt_index=row // settings.n))
        return completions

    @torch.no_grad()
    def _generate_call(self, prompt_ids, settings, row_keys):
        tokenizer, causal_lm = self.tokenizer, self.root.causal_lm
        longest = max(len(ids) for ids in prompt_ids)
        pad = tokenizer.pad_token_id
        # Left padding, so every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (longest - len(ids)) + list(ids) for ids in prompt_ids], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device
        )
        distributed = is_distributed() and hasattr(self.root, "unshard")  # an FSDP-sharded policy
        if distributed:
            self.root.unshard()  # the root's own parameters (embeddings, head) are needed outside its forward
        was_training = causal_lm.training
        causal_lm.eval()
        try:
            sampler = KeyedSampler(row_keys, longest, settings.temperature, settings.top_p, settings.min_p)
            # Greedy decoding over the keyed sampler; generate() repeats prompts only when it samples itself.
            input_ids = input_ids.repeat_interleave(settings.n, dim=0)
            attention_mask = attention_mask.repeat_interleave(settings.n, dim=0)
            sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None, num_return_sequences=1,
                            logits_processor=LogitsProcessorList([sampler]))
            if settings.stop:
                sampling["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, settings.stop, longest)])
            # fp32 master weights in one process: sample with the training forward's bf16 compute.
            autocast_dtype = getattr(self.root, "autocast_dtype", None)
            with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                output = causal_lm.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **sampling,
                    max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=distributed, return_dict_in_generate=True,
                )
        finally:
            causal_lm.train(was_training)
            if distributed:
                self.root.reshard()
        sequences = output.sequences[:, longest:]
        sampled_logprobs = sampler.sampled_logprobs()  # [B*n, T], kept step by step: no [B, T, V] logits
        completions = []
        eos = tokenizer.eos_token_id
        for row, tokens in enumerate(sequences.tolist()):
            if eos in tokens:
                end, finish = tokens.index(eos) + 1, "stop"
            elif settings.stop and (stop_end := self._stop_end(tokens, settings.stop)) is not None:
                end, finish = stop_end, "stop"  # generate() padded the row after the stop string
            else:
                end, finish = len(tokens), "length"
            kept = tokens[:end]
            completions.append(Completion(
                prompt_index=row // settings.n, token_ids=kept,
                text=tokenizer.decode(kept, skip_special_tokens=False), finish_reason=finish,
                logprobs=sampled_logprobs[row, :end].tolist(),
            ))
        return completions


class _PlainRoot(torch.nn.Module):
    """The rollout engine's view of an unwrapped model."""

    def __init__(self, causal_lm):
        super().__init__()
        self.causal_lm = causal_lm


def plan_generate_calls(prompt_lengths, samples, max_new_tokens, batch_prompts, max_batch_tokens=None):
    """[(prompt positions, first sample, end sample)]: the generate calls that sample every prompt.

    A call holds at most batch_prompts prompts and, with max_batch_tokens, at most that many
    tokens of KV cache (rows x (longest prompt + max_new_tokens)); a prompt whose samples alone
    exceed it is sampled in several calls of fewer samples each.
    """
    calls, current = [], []

    def cache_tokens(positions, rows_per_prompt):
        return len(positions) * rows_per_prompt * (max(prompt_lengths[p] for p in positions) + max_new_tokens)

    for position in range(len(prompt_lengths)):
        candidate = current + [position]
        fits = max_batch_tokens is None or cache_tokens(candidate, samples) <= max_batch_tokens
        if current and (len(candidate) > batch_prompts or not fits):
            calls.append((current, 0, samples))
            current, candidate = [], [position]
        if max_batch_tokens is not None and cache_tokens(candidate, samples) > max_batch_tokens:
            per_call = rows_per_generate_call(max_batch_tokens, prompt_lengths[position], max_new_tokens)
            calls.extend(([position], first, min(first + per_call, samples)) for first in range(0, samples, per_call))
            continue
        current = candidate
    if current:
        calls.append((current, 0, samples))
    return calls


def sample_completions(causal_lm, tokenizer, prompts, settings, batch_prompts=32, progress=True, device=None, seed=0,
                       prompt_keys=None, max_batch_tokens=None):
    """settings.n completions for every prompt: a list (per prompt) of lists of Completion.

    Sampling is keyed by (seed, prompt key, sample index), so results depend neither on how the
    prompts are batched (batch_prompts, max_batch_tokens) nor on which rank samples them.
    prompt_keys: one per prompt, default its position (a share of a benchmark passes its indices).
    """
    from tqdm import tqdm

    device = device or next(causal_lm.parameters()).device
    engine = HFRolloutEngine(_PlainRoot(causal_lm), tokenizer, device)
    prompt_keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
    per_prompt = [[] for _ in prompts]
    calls = plan_generate_calls([len(p) for p in prompts], settings.n, settings.max_new_tokens, batch_prompts,
                                max_batch_tokens)
    for positions, first, end in tqdm(calls, desc="sampling", unit="call", disable=not progress, dynamic_ncols=True):
        keys = sequence_keys(seed, 0, [prompt_keys[p] for p in positions], settings.n).view(len(positions), -1)
        call_settings = dataclasses.replace(settings, n=end - first)
        batch = [prompts[p] for p in positions]
        for completion in engine.generate(batch, call_settings, row_keys=keys[:, first:end].reshape(-1)):
            per_prompt[positions[completion.prompt_index]].append(completion)
    return per_prompt


def generate_cache_bytes(architecture, rows, sequence):
    """The KV cache of one HF generate call growing to `sequence` tokens in `rows` rows: each decoding
    step's cache update copies one layer's cache, so one layer's worth more at the end."""
    layers = architecture.num_hidden_layers
    return rows * sequence * kv_bytes_per_token(architecture) * (layers + 1) / layers


def kv_bytes_per_token(architecture, dtype_bytes=2):
    text = architecture.get_text_config() if hasattr(architecture, "get_text_config") else architecture
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
