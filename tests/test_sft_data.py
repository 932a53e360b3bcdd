"""How SFT rows become token documents: chat templates of reasoning models, and error locations."""

import pytest

from trainer.config import load_config
from trainer.data import (
    DataError,
    DataStats,
    build_documents,
    load_records,
    render_completion,
    tokenize_chat,
)
from trainer.toy.model_dir import build_tokenizer
from trainer.toy.task import WORDS

TRACE = "3 + 1 = 4 . wait , check 3 + 1 = 4 . yes . \\boxed{ 4 } </think> so 4 ."

# The history form of reasoning-model templates: an assistant turn keeps only what follows
# '</think>'. The second variant also opens the generation prompt with the reasoning word.
_DROPS_REASONING = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|im_start|> user {{ message['content'] }}<|im_end|>{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "<|im_start|> assistant{{ content }}<|im_end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
_DROPS_REASONING_AND_OPENS_TURN = _DROPS_REASONING.replace(
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}",
    "{% if add_generation_prompt %}<|im_start|> assistant<think>\n{% endif %}",
)


@pytest.fixture
def tokenizer():
    return build_tokenizer(WORDS)


def completion_text(tokenizer, document):
    return tokenizer.decode([i for i, counted in zip(document.input_ids, document.completion_mask) if counted])


def chat(answer=TRACE):
    return [{"role": "user", "content": "tom has 3 apples"}, {"role": "assistant", "content": answer}]


def test_plain_template_renders_the_completion(tokenizer):
    stats = DataStats()
    document = tokenize_chat(tokenizer, chat(), stats)
    assert completion_text(tokenizer, document) == TRACE + "<|im_end|>"
    assert stats.completions_outside_template == 0


def test_template_that_drops_the_reasoning_keeps_the_whole_trace(tokenizer):
    tokenizer.chat_template = _DROPS_REASONING
    stats = DataStats()
    document = tokenize_chat(tokenizer, chat(), stats)
    text = completion_text(tokenizer, document)
    assert text == TRACE + "<|im_end|>"  # the reasoning is trained on, and the model learns to stop
    assert stats.completions_outside_template == 1
    prompt_text = tokenizer.decode(document.input_ids[: document.completion_mask.index(True)])
    assert prompt_text.endswith("assistant")


@pytest.mark.parametrize("answer", ["<think>\n" + TRACE, TRACE])
def test_generation_prompt_that_opens_the_thinking_is_not_repeated(tokenizer, answer):
    tokenizer.chat_template = _DROPS_REASONING_AND_OPENS_TURN
    prompt, completion, by_template = render_completion(tokenizer, chat(answer))
    assert not by_template
    assert prompt.endswith("assistant<think>\n") and completion == TRACE + "<|im_end|>"


def test_completion_is_never_cut_where_it_merely_shares_letters_with_the_prompt(tokenizer):
    tokenizer.chat_template = _DROPS_REASONING
    answer = "t" + TRACE  # the prompt ends in "assistant"
    _, completion, _ = render_completion(tokenizer, chat(answer))
    assert completion == answer + "<|im_end|>"


def test_missing_field_names_the_file_line_after_blank_lines(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"problem": "a", "solution": "b"}\n\n\n{"problem": "c", "answer": "d"}\n', encoding="utf-8"
    )
    config = load_config(None, [f"data.train_files={path}", "model.path=unused"]).data
    records = load_records([str(path)])
    assert [number for _, number, _ in records] == [1, 4]
    with pytest.raises(DataError, match=r"rows\.jsonl:4: missing field 'solution' \(fields present: answer, problem\)"):
        build_documents(records, tokenizer, config, None)
