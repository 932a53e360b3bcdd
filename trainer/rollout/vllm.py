"""Rollouts through a colocated vLLM engine (`pip install -e .[vllm]`), one per training rank.

The engine shares the GPU with training: it sleeps (weights offloaded to CPU, KV cache freed)
between rollouts, wakes to generate, and receives the policy's new weights after every
optimizer step. vllm is imported only here.

Written against vLLM's documented Python API (LLM, SamplingParams, sleep/wake_up); it has not
run on this project's CI machines, which cannot install vLLM.
"""

from . import Completion


class VLLMRolloutEngine:
    holds_weights = True

    def __init__(self, model_path, tokenizer, *, gpu_memory_utilization=0.3, dtype="bfloat16", seed=0,
                 max_model_len=None):
        try:
            from vllm import LLM
        except ImportError as error:
            raise RuntimeError(
                f"grpo.rollout_engine=vllm needs vllm ({error}); install it with pip install -e .[vllm]"
            ) from None
        import torch

        self.tokenizer = tokenizer
        self.weight_dtype = getattr(torch, dtype)  # what sync_weights sends
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, enable_prefix_caching=True,
        )
        self.llm.sleep(level=1)

    def generate(self, prompt_ids, settings, row_keys=None):
        """row_keys are not used: vLLM draws from its own seeded generator."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=settings.n, temperature=settings.temperature, top_p=settings.top_p, min_p=settings.min_p,
            max_tokens=settings.max_new_tokens, stop=settings.stop or None, logprobs=0,
        )
        self.llm.wake_up()
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        completions = []
        for prompt_index, output in enumerate(outputs):
            for sample in output.outputs:
                token_ids = list(sample.token_ids)
                logprobs = None
                if sample.logprobs:
                    # With logprobs=0 each position holds the sampled token's log-prob.
                    logprobs = [position[token].logprob for token, position in zip(token_ids, sample.logprobs)]
                completions.append(Completion(
                    prompt_index=prompt_index, token_ids=token_ids, text=sample.text,
                    finish_reason="length" if sample.finish_reason == "length" else "stop", logprobs=logprobs,
                ))
        return completions

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def load_weights(self, named_tensors):
        """Copies (name, full tensor) pairs, Hugging Face names, into the engine's model."""
        self.llm.wake_up(tags=["weights"])
        try:
            self._model().load_weights(weights=list(named_tensors))
        finally:
            self.llm.sleep(level=1)
