"""Batched sampling through transformers' generate, on the training model itself (whole or FSDP-sharded)."""

import dataclasses

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..parallel import all_reduce_max, is_distributed
from . import Completion
from .keyed_sampling import KeyedSampler


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


class HFRolloutEngine:
    """max_batch_tokens: KV-cache tokens per generate call at most, rows x (longest prompt +
    max_new_tokens); a rollout needing more is sampled in several calls of fewer rows."""

    def __init__(self, root_module, tokenizer, device, max_batch_tokens=None):
        self.root, self.tokenizer, self.device = root_module, tokenizer, device
        self.max_batch_tokens = max_batch_tokens

    holds_weights = False  # generation runs on the policy's own parameters: nothing to sync

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
