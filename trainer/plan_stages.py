"""The plan of each stage: one step measured on fake tensors (trainer.plan_measure), the rest
counted from the shapes, as phases of one rank's GPU memory by category, plus host memory and
FLOPs. `python -m trainer.plan` (trainer/plan.py) reads the configuration and prints them.
"""

import dataclasses

GIB = 2**30
PLANNED_PROMPT_TOKENS = 1024  # prompts of evaluation, and of GRPO without grpo.max_prompt_tokens


@dataclasses.dataclass
class Phase:
    name: str
    items: dict  # row -> bytes on one GPU

    @property
    def total(self):
        return sum(self.items.values())


@dataclasses.dataclass
class StagePlan:
    stage: str
    phases: list
    host: list = dataclasses.field(default_factory=list)  # (what, bytes per node, how)
    flops: list = dataclasses.field(default_factory=list)  # (what, FLOPs)
    notes: list = dataclasses.field(default_factory=list)
    decoder_activations: int = 0  # bytes the decoder layers hold between forward and backward

    @property
    def peak_phase(self):
        return max(self.phases, key=lambda phase: phase.total)

    def largest_item(self):
        items = self.peak_phase.items
        name = max(items, key=items.get)
        return name, items[name]


def gib(size):
    return f"{size / GIB:.1f}"


# ---------------------------------------------------------------------------------------------
# Shapes of one step


def fill_row(budget, longest, available):
    """Document lengths of the largest row a token budget allows: documents of at most `longest`
    tokens, `available` tokens in all (None budget: one row holding them all)."""
    tokens = available if budget is None else min(budget, available)
    lengths = [longest] * (tokens // longest)
    return lengths + ([tokens % longest] if tokens % longest else [])


def packed_documents(lengths, capacity):
    """The model inputs SFT's own packer (data.pack_documents, collate) makes of documents of these
    lengths with `capacity` tokens a row: every token a completion token."""
    from .data import Document, collate, pack_documents

    documents = [Document([0] * length, [True] * length) for length in lengths]
    batch = collate(pack_documents(documents, capacity), pad_token_id=0)
    batch.pop("pad_tokens")
    return batch


def packed_rollouts(lengths, prompt_tokens, config, world_size):
    """The PackedStep GRPO's own packer (grpo_batch.pack_step) makes of rollouts with these sequence
    lengths: prompts of up to prompt_tokens tokens, the rest completion. Packed on real tensors (the
    packer reads its counts), then measured on fake ones."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .grpo_batch import pack_step
    from .rollout import Completion

    prompts = [([0] * min(prompt_tokens, length - 1), "0") for length in lengths]
    completions = [Completion(index, [0] * (length - len(prompts[index][0])), "", "stop",
                              logprobs=[0.0] * (length - len(prompts[index][0])))
                   for index, length in enumerate(lengths)]
    with unset_fake_temporarily():
        step = pack_step(prompts, completions, torch.ones(len(lengths)), config, 0, torch.device("cpu"), world_size)
    # The boundaries are read as numbers (the attention's grouping, the FLOP counter): made again from
    # Python data inside fake mode, they stay readable there.
    for row in step.rows:
        boundaries = row.inputs["document_boundaries"]
        row.inputs["document_boundaries"] = torch.tensor(boundaries.tolist(), dtype=boundaries.dtype)
    return step


def training_rows(peak):
    """Table rows of a tracked forward and backward."""
    return {
        "parameters": peak.get("sharded_params", 0) + peak.get("gathered_params", 0),
        "gradients": peak.get("sharded_grads", 0) + peak.get("unsharded_grads", 0),
        "activations": peak.get("activations", 0),
        "temporaries": peak.get("temporaries", 0) + peak.get("inputs", 0) + peak.get("buffers", 0),
        "communication buffers": peak.get("all_gather", 0) + peak.get("reduce_scatter", 0),
    }


def decoder_checkpoints(root):
    """Where the decoder layers' activations start and end: the first layer's input, the last one's output."""
    layers = root.causal_lm.model.layers
    return [("first layer", layers[0], "start"), ("last layer", layers[-1], "end")]


def note_layer_activations(plan, measured, architecture, tokens):
    """Records the activations the decoder layers keep for backward, beside layers x tokens x hidden x 2 bytes."""
    held = measured.activations_at["last layer end"] - measured.activations_at["first layer start"]
    expected = architecture.num_hidden_layers * tokens * architecture.hidden_size * 2
    plan.decoder_activations = held
    plan.notes.append(f"activations held by the decoder layers between forward and backward: {gib(held)} GiB "
                      f"(layers x tokens x hidden x 2 bytes = {gib(expected)} GiB)")


# ---------------------------------------------------------------------------------------------
# The stages


def _training_state(config, architecture, mesh):
    from .plan_measure import build_sharded_model, local_bytes, measure_optimizer_step

    policy = build_sharded_model(architecture, config, mesh, trainable=True)
    parameters = [p for p in policy.parameters() if p.requires_grad]
    states, optimizer_temporaries = measure_optimizer_step(parameters, config.optim)
    return policy, local_bytes(parameters), states, optimizer_temporaries


def _optimizer_phase(sharded, states, temporaries, extra=None):
    return Phase("optimizer step", {"parameters": sharded, "gradients": sharded, "optimizer states": states,
                                    "temporaries": temporaries, **(extra or {})})


def plan_sft(config, architecture, mesh, world_size):
    from .plan_measure import measure

    data, train = config.data, config.train
    policy, sharded, states, optimizer_temporaries = _training_state(config, architecture, mesh)
    budget = train.max_tokens_per_micro_batch
    if budget:
        lengths, batch = fill_row(budget, data.max_seq_len, budget), 1
    else:
        lengths, batch = [data.max_seq_len], train.micro_batch_size
    inputs = packed_documents(lengths * batch, budget or data.max_seq_len)
    tokens = batch * sum(lengths)

    def micro_batch():
        policy(**inputs).backward()

    # Two micro-batches: the second runs with the first one's gradients held.
    measured = measure(policy, micro_batch, repeats=2, checkpoints=decoder_checkpoints(policy))
    forward_backward = training_rows(measured.peak)
    forward_backward["optimizer states"] = states
    plan = StagePlan("sft", [Phase(f"forward+backward ({tokens} tokens)", forward_backward),
                             _optimizer_phase(sharded, states, optimizer_temporaries)])
    note_layer_activations(plan, measured, architecture, tokens)
    per_micro_batch = measured.flops
    plan.flops += [("per micro-batch per GPU", per_micro_batch),
                   (f"per step ({train.grad_accum} micro-batches x {world_size} GPUs)",
                    per_micro_batch * train.grad_accum * world_size)]
    return plan


def grpo_shapes(config):
    """(one rank's RolloutShape, note) of the configured rollouts."""
    from .rollout import RolloutShape

    grpo = config.grpo
    prompt = grpo.max_prompt_tokens
    note = None
    if prompt is None:
        prompt = PLANNED_PROMPT_TOKENS
        note = f"grpo.max_prompt_tokens is unset: planned with {PLANNED_PROMPT_TOKENS}-token prompts"
    return RolloutShape(prompt, prompt + grpo.sampling.max_new_tokens, grpo.prompts_per_step * grpo.group_size), note


def rollout_phases(config, architecture, policy, resident, gpu_bytes, shape):
    """([the phases while the configured engine samples a step], notes): the resident training state
    plus what the engine holds (rollout.base.RolloutEngine.plan_rollout)."""
    from .rollout import engine_class

    planned, notes = engine_class(config.grpo.engine.name).plan_rollout(config, architecture, policy, resident,
                                                                             gpu_bytes, shape)
    return [Phase(name, items) for name, items in planned], notes


def _reference_forward(reference, row, grpo, low_memory, training_state):
    """(the phase of the reference model's forward over one packed row, its log-probs, its FLOPs)."""
    import torch

    from .grpo_loss import logprob_head
    from .plan_measure import measure

    logprobs = []

    def forward():
        with torch.no_grad():
            logprobs.append(reference(**row.inputs, head=logprob_head(row, grpo, low_memory)))

    measured = measure(reference, forward)
    items = training_rows(measured.peak)
    items["reference model"] = items.pop("parameters")  # its shards and the layers it gathers
    items.update(training_state)
    return Phase(f"reference log-probs ({row.tokens} tokens)", items), logprobs[-1], measured.flops


def plan_grpo(config, architecture, mesh, world_size, gpu_bytes):
    import torch

    from .grpo_loss import STATISTICS, loss_head
    from .plan_measure import build_sharded_model, local_bytes, measure

    grpo, budget = config.grpo, config.train.max_tokens_per_micro_batch
    shape, shape_note = grpo_shapes(config)
    sequence, sequences = shape.sequence_tokens, shape.sequences
    policy, sharded, states, optimizer_temporaries = _training_state(config, architecture, mesh)
    reference = build_sharded_model(architecture, config, mesh, trainable=False) if grpo.loss.beta > 0 else None
    reference_bytes = local_bytes(reference.parameters()) if reference is not None else 0
    lengths = fill_row(budget, sequence, sequences * sequence)
    step = packed_rollouts(lengths, shape.prompt_tokens, config, world_size)
    row, tokens = step.rows[0], sum(lengths)
    inputs = row.inputs
    low_memory = config.train.low_memory_loss
    resident = {"parameters": sharded, "optimizer states": states}
    if reference_bytes:
        resident["reference model"] = reference_bytes
    phases, notes = rollout_phases(config, architecture, policy, resident, gpu_bytes, shape)
    plan = StagePlan("grpo", phases, notes=notes)
    ref_logp, reference_flops = None, 0
    if reference is not None:
        phase, ref_logp, reference_flops = _reference_forward(reference, row, grpo, low_memory,
                                                              {"parameters": sharded, "optimizer states": states})
        phases.append(phase)
        plan.flops.append(("reference forward per row per GPU", reference_flops))

    statistics = torch.zeros(STATISTICS)

    def policy_row():
        policy(**inputs, head=loss_head(step, 0, None, ref_logp, grpo, low_memory, statistics)).backward()

    # Two rows: the second runs with the first one's gradients held.
    measured = measure(policy, policy_row, repeats=2, checkpoints=decoder_checkpoints(policy))
    items = training_rows(measured.peak)
    items["optimizer states"] = states
    if reference_bytes:
        items["reference model"] = reference_bytes
    phases.append(Phase(f"policy forward+backward ({tokens} tokens)", items))
    phases.append(_optimizer_phase(sharded, states, optimizer_temporaries,
                                   {"reference model": reference_bytes} if reference_bytes else None))
    note_layer_activations(plan, measured, architecture, tokens)
    plan.notes.append(f"the largest row: {tokens} tokens in documents of up to {sequence} tokens "
                      f"(train.max_tokens_per_micro_batch={budget}; {sequences} sequences per GPU per step)")
    plan.flops.append(("policy forward+backward per row per GPU", measured.flops))
    # Per row: the reference forward, grpo.num_iterations updates and, with more than one, a
    # forward for the old log-probs (about a third of an update's FLOPs with recomputation).
    iterations = grpo.num_iterations
    row_flops = reference_flops + iterations * measured.flops + (measured.flops / 4 if iterations > 1 else 0)
    step_tokens = sequences * sequence * world_size
    plan.flops.append((f"per step, training only ({step_tokens} tokens at full length over {world_size} GPUs, "
                       f"{iterations} update(s))", row_flops * step_tokens / tokens))
    if shape_note:
        plan.notes.append(shape_note)
    return plan


def plan_eval(config, architecture, gpu_bytes, parameters):
    """Evaluation: what the eval.engine holds while it samples PLANNED_PROMPT_TOKENS-token prompts."""
    from .rollout import engine_class

    items, note = engine_class(config.eval.engine, key="eval.engine").plan_evaluation(
        config, architecture, gpu_bytes, parameters, PLANNED_PROMPT_TOKENS)
    return StagePlan("eval", [Phase("generation", items)], notes=[note])


# ---------------------------------------------------------------------------------------------
# Host memory per node


def host_lines(stage, world_size, parameters, largest):
    """(what, bytes of process memory per node, how) for loading, checkpoint saves and the export.

    File pages of the checkpoint pass through the page cache, which the kernel reclaims; they are
    named, not counted.
    """
    checkpoint = f"the {gib(parameters * 2)} GiB bf16 checkpoint passes through the page cache"
    if stage == "eval":
        return [("model loading", world_size * largest * 2,
                 f"each of {world_size} ranks moves the bf16 model to its GPU one weight at a time; {checkpoint}")]
    if world_size == 1:
        return [("model loading", largest * 6,
                 f"one weight at a time to the GPU, read in bf16, cast to fp32; {checkpoint}"),
                ("checkpoint save", largest * 4, "one tensor at a time while DCP writes"),
                ("Hugging Face export", largest * 2, "one parameter, in bf16, at a time while it is written")]
    return [
        ("model loading", largest * 6,
         f"each of {world_size} ranks reads its rows of one weight at a time, bf16 and cast to fp32; {checkpoint}"),
        ("checkpoint save", largest * 4, "each rank stages one tensor of its shard at a time while DCP writes"),
        ("Hugging Face export", largest * 2, "rank 0 holds one gathered parameter, in bf16, while it is written"),
    ]


# ---------------------------------------------------------------------------------------------
# One stage


def plan_stage(stage, config, architecture, world_size, gpu_bytes):
    """The StagePlan of one stage, a training stage measured in a fake world of world_size ranks."""
    from .plan_measure import fake_world

    parameters, largest = parameter_counts(architecture)
    if stage == "eval":
        plan = plan_eval(config, architecture, gpu_bytes, parameters)
    else:
        with fake_world(world_size) as mesh:
            plan = (plan_sft(config, architecture, mesh, world_size) if stage == "sft"
                    else plan_grpo(config, architecture, mesh, world_size, gpu_bytes))
        plan.notes.extend(planning_caveats())
        if config.parallel.cpu_offload:
            plan.notes.append("parallel.cpu_offload: the offloaded shards, gradients and optimizer states are "
                              "counted as GPU memory here, so the figures are an upper bound")
    plan.host = host_lines(stage, world_size, parameters, largest)
    return plan


def planning_caveats():
    """What makes this machine plan another code path than a GPU run would take."""
    from fastmath_kernels import HAS_CUDA_EXT

    from .attention import _VARLEN

    caveats = []
    if not HAS_CUDA_EXT:
        caveats.append("the CUDA extension is not built here, so the fused ops were planned with their torch "
                       "backend's buffers, not the CUDA kernels'")
    if _VARLEN is None:
        caveats.append("this torch has no varlen attention, so attention was planned on its grouped-SDPA path")
    return caveats


def parameter_counts(architecture):
    """(parameters, elements of the largest parameter), counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    sizes = [p.numel() for p in model.parameters()]
    return sum(sizes), max(sizes)


