"""Hugging Face Hub names for models and datasets, beside local paths.

A name such as `deepseek-ai/DeepSeek-R1-Distill-Qwen-14B` that is not a local path resolves
through huggingface_hub's cache (downloading what is missing), so the rest of the trainer
always sees a local directory. HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1 for datasets) reads
the cache only. Each failure is one line naming the name and what to do.
"""

import os
import re

from .errors import DataError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a causal LM directory needs: configs, weights, tokenizer files, and code for trust_remote_code.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"]


def is_hub_name(path):
    """`owner/name` that is not an existing local path."""
    return not os.path.exists(path) and bool(_HUB_NAME.match(path))


def _offline(repo_type):
    flags = ["HF_HUB_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    return any(os.environ.get(flag, "").lower() in ("1", "true", "yes", "on") for flag in flags)


def snapshot(name, repo_type, what, allow_patterns=None):
    """The local directory of a Hub repository's snapshot, or a DataError saying why there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline(repo_type)
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        return snapshot_download(name, repo_type=repo_type, allow_patterns=allow_patterns, local_files_only=offline)
    except GatedRepoError:
        raise DataError(f"{what}: {name} is a gated {kind} on the Hugging Face Hub; accept its terms on its page "
                        "and log in (hf auth login), or download it and give the local path") from None
    except RepositoryNotFoundError:
        raise DataError(f"{what}: {name} is neither a local path nor a {kind} on the Hugging Face Hub "
                        "(or it is private: log in with hf auth login)") from None
    except RevisionNotFoundError as error:
        raise DataError(f"{what}: {name}: {str(error).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise DataError(f"{what}: {name} is not a local path, and offline mode (HF_HUB_OFFLINE"
                            f"{' or HF_DATASETS_OFFLINE' if kind == 'dataset' else ''}) finds no cached copy in "
                            f"{_cache_dir()}; download it first or unset the offline flag") from None
        raise DataError(f"{what}: {name} is not a local path and the Hugging Face Hub cannot be reached, "
                        f"with no cached copy in {_cache_dir()}") from None


def _cache_dir():
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def local_model_dir(path, what="model.path"):
    """path itself when it is local; the cached snapshot of a Hub model name otherwise."""
    if not is_hub_name(path):
        return path
    return snapshot(path, "model", what, allow_patterns=MODEL_FILES)


def load_hub_dataset(name, split, what):
    """Rows of one split of a Hub dataset, each with its row number, read through `datasets`."""
    import datasets

    directory = snapshot(name, "dataset", what)
    try:
        rows = list(datasets.load_dataset(directory, split=split))
    except ValueError as error:  # an unknown split names the ones there are
        raise DataError(f"{what}: {name}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # datasets raises many types; the user needs the name and the reason
        raise DataError(f"{what}: {name} could not be read ({str(error).splitlines()[0][:200]})") from None
    return [(name, number, row) for number, row in enumerate(rows, start=1)]
