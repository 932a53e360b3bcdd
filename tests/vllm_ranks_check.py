"""vLLM engines on two ranks under torchrun, as GRPO runs them: each rank syncs a model's weights into
its engine (started without weights) and samples its share of the prompts, keyed. Run by
tests/test_vllm_engine.py:

    torchrun --nproc_per_node 2 tests/vllm_ranks_check.py OUT MODEL TENSOR_PARALLEL

Prompts are the toy task's problems; rank r takes problems r, r + 2, ... Each rank writes
OUT/rank<r>.json: {problem index: [[token ids, log-probs] per sample]}.
"""

import json
import os
import random
import sys

import torch
import torch.distributed as dist


def main(out_dir, model_path, tensor_parallel_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model import CausalLMLoss
    from trainer.rollout import SamplingSettings, ensure_engine_weights
    from trainer.rollout.keyed_sampling import sequence_keys
    from trainer.rollout.vllm import VLLMRolloutEngine

    dist.init_process_group("gloo")  # as the trainer has it before its engine starts
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    engine = VLLMRolloutEngine(model_path, tokenizer, tensor_parallel_size=tensor_parallel_size, seed=0,
                               max_model_len=512)
    ensure_engine_weights(CausalLMLoss(model), engine)
    prompts = toy_prompts(tokenizer)
    share = list(range(rank, len(prompts), world_size))
    settings = SamplingSettings(n=SAMPLES, temperature=1.0, top_p=1.0, max_new_tokens=16)
    completions = engine.generate([prompts[i] for i in share], settings, row_keys=sequence_keys(0, 0, share, SAMPLES))
    samples = {index: [] for index in share}
    for completion in completions:
        samples[share[completion.prompt_index]].append([completion.token_ids, completion.logprobs])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(samples, handle)
    dist.barrier()
    dist.destroy_process_group()


SAMPLES = 3


def toy_prompts(tokenizer, count=6):
    """Chat prompts of toy problems, as the trainer builds them."""
    from trainer.toy.task import make_problem

    rng = random.Random(5)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": make_problem(rng)["problem"]}],
                                           tokenize=False, add_generation_prompt=True) for _ in range(count)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
