"""Sharded checkpoints (torch.distributed.checkpoint) written atomically, and the final HF export.

A checkpoint is written to `step_XXXXXXXX.tmp`, given a manifest of every file's size and CRC-32,
and only then renamed to `step_XXXXXXXX`. A directory without a manifest that matches its files
is never loaded: a save killed halfway, or a file corrupted later, leaves the previous
checkpoint the latest complete one.
"""

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
import zlib

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .errors import ConfigError, UnsafeCheckpoint
from .parallel import all_gather_objects, barrier, world_size

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save and load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_root(run_dir):
    return os.path.join(run_dir, "checkpoints")


def _rng_state():
    """This rank's random generators, in plain types that weights_only loading accepts."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(python_state), gauss],
        "numpy": [numpy_keys.tolist(), numpy_pos, numpy_has_gauss, numpy_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state):
    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _crc32(path):
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def _checksums(directory, rank, world_size):
    """{relative path: size and CRC-32} of this rank's share of the directory's files.

    Files are dealt out round-robin by name, largest first, so every rank reads about as much
    and no rank waits in a barrier while one reads the whole checkpoint.
    """
    paths = []
    for root, _, names in os.walk(directory):
        paths.extend(os.path.join(root, name) for name in names)
    paths.sort(key=lambda path: (-os.path.getsize(path), path))
    return {os.path.relpath(path, directory): {"size": os.path.getsize(path), "crc32": _crc32(path)}
            for path in paths[rank::world_size]}


def _write_manifest(directory, files):
    with open(os.path.join(directory, MANIFEST + ".tmp"), "w") as handle:
        json.dump({"files": dict(sorted(files.items()))}, handle)
    os.replace(os.path.join(directory, MANIFEST + ".tmp"), os.path.join(directory, MANIFEST))


def _matches(path, expected):
    if not os.path.isfile(path):
        return False
    if isinstance(expected, int):  # a manifest of sizes only
        return os.path.getsize(path) == expected
    return os.path.getsize(path) == expected["size"] and _crc32(path) == expected["crc32"]


def is_complete(directory):
    """True when the manifest exists and every file it lists has its recorded size and CRC-32."""
    try:
        with open(os.path.join(directory, MANIFEST)) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all(_matches(os.path.join(directory, name), expected) for name, expected in files.items())


def latest_checkpoint(run_dir, log=print):
    """The newest complete checkpoint directory, or None; incomplete ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted((name for name in os.listdir(root) if _STEP_DIR.match(name)), reverse=True)
    for name in steps:
        path = os.path.join(root, name)
        if is_complete(path):
            return path
        log(f"checkpoint {path} is incomplete or corrupted (manifest check failed); skipping it")
    return None


def check_no_earlier_checkpoints(config):
    """A fresh run (not checkpoint.resume=auto) refuses a run_dir that holds another run's checkpoints.

    Pruning and --resume auto pick checkpoints by step number, so an earlier run's later steps
    would outlive the new run's and be resumed from as if they were its own.
    """
    if config.checkpoint.resume == "auto":
        return
    run_dir = config.run_dir
    root = checkpoint_root(run_dir)
    found = sorted(name for name in os.listdir(root) if _STEP_DIR.match(name)) if os.path.isdir(root) else []
    if found:
        raise ConfigError(
            f"run_dir {run_dir} already holds checkpoints of an earlier run ({', '.join(found)} in {root}); "
            f"pass --resume auto (checkpoint.resume=auto) to continue that run, choose another run_dir, "
            f"or delete {root}"
        )


def save_checkpoint(run_dir, step, model, optimizer, scheduler, trainer_state, rank, keep):
    """Collective: every rank calls it. Returns the final directory."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    temporary = final + ".tmp"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=temporary)
    torch.save(
        {"scheduler": scheduler.state_dict(), "trainer": trainer_state, "rng": _rng_state()},
        os.path.join(temporary, f"trainer_state_rank{rank}.pt"),
    )
    barrier()
    files = {}
    for share in all_gather_objects(_checksums(temporary, rank, world_size())):
        files.update(share)
    if rank == 0:
        _write_manifest(temporary, files)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(temporary, final)
        _prune(root, keep)
    barrier()
    return final


def _prune(root, keep):
    complete = sorted(name for name in os.listdir(root) if _STEP_DIR.match(name))
    for name in complete[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)



class _MetadataOnly(pickle.Unpickler):
    """Unpickles DCP's .metadata allowing only the plain classes it is made of: no callables."""

    def find_class(self, module, name):
        allowed = (
            module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise UnsafeCheckpoint(f"{module}.{name}")
        return super().find_class(module, name)


def check_metadata_is_data(path):
    """DCP reads its .metadata with pickle; refuse one that names anything but metadata classes."""
    metadata = os.path.join(path, ".metadata")
    try:
        with open(metadata, "rb") as handle:
            _MetadataOnly(handle).load()
    except UnsafeCheckpoint as error:
        raise UnsafeCheckpoint(f"{metadata} refers to {error}, which loading would run; not loading it") from None


def load_checkpoint(path, model, optimizer, scheduler, rank):
    """Restores model, optimizer, scheduler and this rank's RNG; returns the saved trainer state.

    Nothing in it is unpickled as code: tensors and trainer state load with weights_only=True,
    and DCP's pickled .metadata is checked to hold metadata classes only before DCP reads it.
    """
    check_metadata_is_data(path)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    saved = torch.load(os.path.join(path, f"trainer_state_rank{rank}.pt"), weights_only=True)
    scheduler.load_state_dict(saved["scheduler"])
    _restore_rng(saved["rng"])
    return saved["trainer"]
