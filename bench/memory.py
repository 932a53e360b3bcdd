"""Peak extra memory of one call, measured in a fresh subprocess.

CUDA: torch.cuda.max_memory_allocated above what was allocated before the call.
CPU: the process's peak resident set (VmHWM) above its resident set before the call, with the
peak reset first through /proc/self/clear_refs (Linux), so imports and set-up do not count.
"""

import ctypes
import gc

import torch


def _read_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_freed_memory():
    """Hands freed heap memory back to the OS (glibc), so the next peak starts from a clean floor."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_extra_bytes(fn, device):
    """Runs fn() once and returns the peak memory it added, in bytes."""
    release_freed_memory()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    before = _read_status_kib("VmRSS")
    fn()
    return 1024 * max(0, _read_status_kib("VmHWM") - before)
