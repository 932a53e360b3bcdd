"""Stage 1: supervised fine-tuning on packed chat sequences, loss on completions only."""

from .data import build_documents, collate, epoch_order, load_records, pack_documents
from .errors import DataError
from .training import run_stage


class SFTData:
    """Packs in a seeded order per epoch; the data position is the step number alone."""

    def __init__(self, config, tokenizer, world_size, log):
        data = config.data
        records = load_records(data.train_files, split=data.split)
        documents, stats = build_documents(records, tokenizer, data, config.model.system_prompt)
        # With a token budget each micro-batch is one pack of at most that many tokens.
        capacity = config.train.max_tokens_per_micro_batch or data.max_seq_len
        self.packs = pack_documents(documents, capacity, data.pack, data.packing)
        self.micro_batch_size, self.grad_accum = config.train.micro_batch_size, config.train.grad_accum
        self.world_size, self.seed = world_size, config.train.seed
        self.pad_token_id = tokenizer.pad_token_id
        self.packs_per_step = self.micro_batch_size * self.grad_accum * world_size
        self.steps_per_epoch = len(self.packs) // self.packs_per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train_files: {len(self.packs)} packed sequences are fewer than one step needs "
                f"({self.packs_per_step} = train.micro_batch_size x train.grad_accum x ranks)"
            )
        unused = len(self.packs) - self.steps_per_epoch * self.packs_per_step
        filled = sum(len(document.input_ids) for document in documents) / (len(self.packs) * capacity)
        log(
            f"data: {stats.examples} examples, {stats.truncated} truncated and {stats.dropped_overlong} dropped "
            f"as longer than {data.max_seq_len} tokens, {stats.dropped_empty_completion} without completion "
            f"tokens; {len(documents)} documents in {len(self.packs)} sequences of up to {capacity} tokens "
            f"({filled:.1%} filled), {self.steps_per_epoch} steps per epoch ({unused} sequences per epoch left out "
            "to keep steps whole)"
        )
        if stats.completions_outside_template:
            log(
                f"data: the chat template rewrites assistant turns (it drops reasoning before </think>); "
                f"{stats.completions_outside_template} completions were taken verbatim from the data, "
                "after the generation prompt, ending in the EOS token"
            )

    def micro_batches(self, step, rank):
        epoch, index = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.packs), epoch, self.seed)
        chosen = order[index * self.packs_per_step : (index + 1) * self.packs_per_step][rank :: self.world_size]
        size = self.micro_batch_size
        return [
            collate([self.packs[i] for i in chosen[start : start + size]], self.pad_token_id)
            for start in range(0, len(chosen), size)
        ]


class SFTStage:
    """Stage 1 for the trainer's loop: each step trains on this rank's packs of that step."""

    plots = [("loss", "loss.png", "SFT loss")]

    def __init__(self, config):
        self.config, self.data = config, None

    def prepare(self, tokenizer, world_size, log):
        self.data = SFTData(self.config, tokenizer, world_size, log)
        return self.data.steps_per_epoch

    def start(self, trainer, log):
        pass

    def train_step(self, trainer, step):
        values = trainer.train_step(self.data.micro_batches(step, trainer.rank))
        values["epoch"] = step // self.data.steps_per_epoch
        return values

    def closing_messages(self):
        return []


def run_sft(config):
    return run_stage(config, SFTStage(config))
