"""Writes a real, tiny Hugging Face model directory: Llama config, safetensors, tokenizer.

No hub is reachable, so the embedded task and the tests build their model here and then load
it back through transformers like any other local directory.
"""

import json
import os

import torch

# A chat template in the Qwen style; the assistant turn ends with the end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|> {{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "</think>"]
ROLE_WORDS = ["system", "user", "assistant"]


def build_tokenizer(words):
    """A word-level tokenizer over `words`: one token per word, one per digit, exact round trip.

    Words are stored with a leading "▁" (a space marker) and digits without, so decoding
    "▁tom ▁has ▁ 3 7" gives back "tom has 37": multi-digit numbers survive the round
    trip that answer checking depends on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    marker = "▁"
    vocabulary = {}
    for token in SPECIAL_TOKENS + [marker] + [str(d) for d in range(10)]:
        vocabulary.setdefault(token, len(vocabulary))
    for word in ROLE_WORDS + list(words):
        vocabulary.setdefault(marker + word, len(vocabulary))
    core = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=marker, prepend_scheme="always"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    core.decoder = decoders.Metaspace(replacement=marker, prepend_scheme="always")
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        bos_token=None, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_dir(path, words, *, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=0, tie_embeddings=True):
    """Creates `path` holding a randomly initialised Llama-architecture causal LM and its tokenizer.

    Llama, because AutoTokenizer maps some architectures (Qwen2 among them) to their own
    tokenizer class, which would rebuild a byte-level BPE instead of loading this word-level one.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "fastmath_toy.json"), "w") as handle:
        json.dump({"words": list(words), "seed": seed}, handle)
    return path
