"""SFT data: local jsonl/json/parquet files or Hub datasets through `datasets`, chat-formatted, packed.

Each example becomes one document: the prompt (system + user turns) and the completion
(the assistant turn). Only completion tokens carry a loss (data.loss_on=all: every token). Documents are packed into
sequences of at most max_seq_len tokens; position ids restart per document and the
document-masked attention (trainer/attention.py) keeps every token inside its own document.
"""

import dataclasses
import json
import os

import torch

from .attention import packed_inputs
from .errors import DataError
from .packing import PACKINGS

IGNORE_INDEX = -100
DATA_FILE_TYPES = (".jsonl", ".json", ".parquet")



@dataclasses.dataclass
class Document:
    input_ids: list
    completion_mask: list  # True where the token belongs to the completion


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty_completion: int = 0
    # Completions the chat template would have rewritten, taken verbatim from the data instead.
    completions_outside_template: int = 0


def _first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _check_jsonl(path):
    """Line numbers of the records; a malformed line is reported with its number, not a traceback."""
    line_numbers = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            line_numbers.append(number)
    if not line_numbers:
        raise DataError(f"{path}: no examples (the file is empty)")
    return line_numbers


def load_records(files, split="train", what="data.train_files"):
    """Rows of every file or Hub dataset name, each with (file, line or row number) for error messages.

    A jsonl row carries its line in the file (blank lines are skipped); other formats their row.
    A Hugging Face Hub dataset name (owner/name, not a local path) gives the rows of `split`.
    """
    import datasets

    from .hub import is_hub_name, load_hub_dataset

    records = []
    for path in files:
        # A data file name (data/sft.jsonl) is never taken for a Hub dataset, whether or not it exists.
        if is_hub_name(path) and os.path.splitext(path)[1].lower() not in DATA_FILE_TYPES:
            records.extend(load_hub_dataset(path, split, what))
            continue
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found (nor an owner/name dataset on the Hugging Face Hub)")
        extension = os.path.splitext(path)[1].lower()
        line_numbers = None
        if extension in (".jsonl", ".json"):
            if extension == ".jsonl":
                line_numbers = _check_jsonl(path)
            builder = "json"
        elif extension == ".parquet":
            builder = "parquet"
        else:
            raise DataError(f"{path}: unsupported data file type {extension!r} (use .jsonl, .json or .parquet)")
        try:
            dataset = datasets.load_dataset(builder, data_files=path, split="train")
            # Rows are converted here too: Arrow can fail on odd nested keys only when a row is read.
            rows = list(dataset)
            numbers = line_numbers if line_numbers and len(line_numbers) == len(rows) else range(1, len(rows) + 1)
            records.extend((path, number, row) for number, row in zip(numbers, rows))
        except Exception as error:  # datasets raises many types; the user needs the file and the reason
            raise DataError(f"{path}: could not be read ({_first_line(error)})") from None
    if not records:
        raise DataError(f"no examples in {', '.join(files)}")
    return records


def to_messages(row, data_config, system_prompt, where):
    """The chat of one row: its messages field, or a user turn (problem) and an assistant turn (solution)."""
    if data_config.messages_field:
        messages = row.get(data_config.messages_field)
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field {data_config.messages_field!r} must be a non-empty list of messages")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise DataError(f"{where}: each message needs a 'role' and a string 'content'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (the completion)")
    else:
        fields = {}
        for name in (data_config.problem_field, data_config.solution_field):
            value = row.get(name)
            if value is None:
                present = sorted(key for key, field in row.items() if field is not None)
                raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(present)})")
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            fields[name] = value
        messages = [
            {"role": "user", "content": fields[data_config.problem_field]},
            {"role": "assistant", "content": fields[data_config.solution_field]},
        ]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


THINK_OPEN = "<think>"


def _without_repeated_think_open(prompt, text):
    """text less a leading '<think>' that the generation prompt already ends with."""
    stripped = text.lstrip()
    if prompt.rstrip().endswith(THINK_OPEN) and stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].lstrip("\n")
    return text


def render_completion(tokenizer, messages):
    """(prompt, completion, rendered_by_template) of one chat.

    The completion is what the chat template adds after the generation prompt, when that keeps
    the assistant's text. Reasoning-model templates drop everything before '</think>' from
    assistant turns (their history form), or open the turn with '<think>' in the generation
    prompt only; training on their rendering would lose the trace. Then the completion is the
    data's own text (less a '<think>' the generation prompt already opens), then the EOS token.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = messages[-1]["content"]
    if full.startswith(prompt) and answer.strip() in full[len(prompt):]:
        return prompt, full[len(prompt):], True
    return prompt, _without_repeated_think_open(prompt, answer) + (tokenizer.eos_token or ""), False


def tokenize_chat(tokenizer, messages, stats=None):
    """Document of one chat: prompt tokens, then completion tokens (the only ones with a loss)."""
    prompt, completion, rendered_by_template = render_completion(tokenizer, messages)
    if not rendered_by_template and stats is not None:
        stats.completions_outside_template += 1
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return Document(prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids))


def build_documents(records, tokenizer, data_config, system_prompt):
    stats = DataStats()
    documents = []
    for path, number, row in records:
        where = f"{path}:{number}"
        document = tokenize_chat(tokenizer, to_messages(row, data_config, system_prompt, where), stats)
        if data_config.loss_on == "all":  # the prompt's tokens are trained on too
            document = Document(document.input_ids, [True] * len(document.input_ids))
        stats.examples += 1
        if len(document.input_ids) > data_config.max_seq_len:
            if data_config.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            document = Document(
                document.input_ids[: data_config.max_seq_len], document.completion_mask[: data_config.max_seq_len]
            )
        if sum(document.completion_mask[1:]) == 0:  # nothing left to learn from
            stats.dropped_empty_completion += 1
            continue
        documents.append(document)
    if not documents:
        raise DataError(
            f"no usable examples: {stats.examples} read, {stats.dropped_overlong} over max_seq_len "
            f"dropped, {stats.dropped_empty_completion} without completion tokens"
        )
    return documents, stats


@dataclasses.dataclass
class Pack:
    input_ids: list
    targets: list
    position_ids: list
    document_lengths: list


def document_targets(document):
    """Next-token targets: the following token where it is a completion token, else ignored."""
    ids, mask = document.input_ids, document.completion_mask
    return [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]


def pack_documents(documents, max_seq_len, pack=True, packing="first_fit_decreasing"):
    """Documents packed into rows of at most max_seq_len tokens by `packing` (packing.PACKINGS), each
    row's documents in data order (pack=False: one document a row). The rows are shuffled every epoch."""
    lengths = [len(document.input_ids) for document in documents]
    rows = PACKINGS[packing](lengths, max_seq_len) if pack else [[index] for index in range(len(documents))]
    packs = []
    for members in rows:
        current = Pack([], [], [], [])
        for document in (documents[index] for index in sorted(members)):
            current.input_ids.extend(document.input_ids)
            current.targets.extend(document_targets(document))
            current.position_ids.extend(range(len(document.input_ids)))
            current.document_lengths.append(len(document.input_ids))
        packs.append(current)
    return packs


def collate(packs, pad_token_id):
    """Micro-batch tensors: input_ids, position_ids, targets [B, L], the document boundaries, and
    the number of pad tokens that fill rows up to the longest.

    No attention mask: `document_boundaries` (cumulative lengths over the flattened rows, each
    row's padding one document of its own) tell the document-masked attention where each
    document begins, so no [L, L] tensor exists.
    """
    length = max(len(p.input_ids) for p in packs)
    input_ids = torch.full((len(packs), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(packs), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packs), length), dtype=torch.long)
    lengths = []
    for row, pack in enumerate(packs):
        size = len(pack.input_ids)
        input_ids[row, :size] = torch.tensor(pack.input_ids)
        targets[row, :size] = torch.tensor(pack.targets)
        position_ids[row, :size] = torch.tensor(pack.position_ids)
        position_ids[row, size:] = torch.arange(length - size)
        lengths.extend(pack.document_lengths + ([length - size] if size < length else []))
    return {**packed_inputs(input_ids, position_ids, lengths), "targets": targets,
            "pad_tokens": input_ids.numel() - sum(len(p.input_ids) for p in packs)}


def epoch_order(num_packs, epoch, seed):
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(num_packs, generator=generator).tolist()
