"""The GPU's own ceilings, measured in the same run as the kernels they are compared with."""

import torch


def _cuda_time_ms(fn, repeats=10):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_bytes_per_s(size_bytes=4 << 30):
    """Device-to-device copy: bytes read plus bytes written per second."""
    source = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    milliseconds = _cuda_time_ms(lambda: target.copy_(source))
    return 2 * size_bytes / (milliseconds / 1e3)


def matmul_flops_per_s(dtype=torch.bfloat16, size=8192):
    a = torch.randn(size, size, dtype=dtype, device="cuda")
    b = torch.randn(size, size, dtype=dtype, device="cuda")
    milliseconds = _cuda_time_ms(lambda: a @ b)
    return 2 * size**3 / (milliseconds / 1e3)
