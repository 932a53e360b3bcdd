"""Builds fastmath_kernels._C, the CUDA extension, when the toolchain allows it.

The build happens when the installed torch is a CUDA build and nvcc is found; otherwise one
line says why it was skipped and the pure-Python package (torch and Triton backends) installs.

Environment:
  FASTMATH_SKIP_CUDA_BUILD=1   never build the extension
  FASTMATH_CUDA_ARCHS          architectures, e.g. "9.0+PTX" (default) or "8.0;9.0;10.0+PTX"
  MAX_JOBS                     parallel nvcc jobs (read by torch's ninja build)
  CUDA_HOME                    the CUDA toolkit; found from nvcc when unset
"""

import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_CUDA_ARCHS = "9.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"fastmath setup: {message}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The toolkit root: CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else nvcc's grandparent.

    nvcc on PATH may be a wrapper script, so its location alone can point at the wrong root.
    """
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def cuda_build_skip_reason():
    if os.environ.get("FASTMATH_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "FASTMATH_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return "torch is not installed (install torch first, then pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    os.environ["CUDA_HOME"] = cuda_home
    return None


def gencode_flags(arch_list):
    """'8.0;9.0+PTX' -> machine code for each arch, plus PTX for those marked +PTX."""
    flags = []
    for entry in arch_list.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        with_ptx = entry.endswith("+PTX")
        number = entry.removesuffix("+PTX").replace(".", "")
        if not number[:-1].isdigit():
            raise ValueError(f"FASTMATH_CUDA_ARCHS: cannot read architecture {entry!r}")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if with_ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise ValueError(f"FASTMATH_CUDA_ARCHS names no architecture: {arch_list!r}")
    return flags


def nvidia_wheel_dirs():
    """Include and library dirs of the nvidia-* wheels that ship cusparse.h and cublas_v2.h.

    torch's CUDAContext.h includes both; a toolkit without them (only nvcc and cudart) relies
    on the copies that came with torch's own CUDA wheels.
    """
    try:
        import nvidia
    except ImportError:
        return [], []
    include_dirs, library_dirs = [], []
    for root in nvidia.__path__:
        for header in ("cusparse.h", "cublas_v2.h"):
            for found in glob.glob(os.path.join(root, "*", "include", header)):
                include_dir = os.path.dirname(found)
                if include_dir not in include_dirs:
                    include_dirs.append(include_dir)
                    for lib in ("lib", "lib64"):
                        lib_dir = os.path.join(os.path.dirname(include_dir), lib)
                        if os.path.isdir(lib_dir):
                            library_dirs.append(lib_dir)
    return include_dirs, library_dirs


def cuda_extension_kwargs():
    skip_reason = cuda_build_skip_reason()
    if skip_reason:
        log(f"skipping the CUDA extension: {skip_reason}; torch and Triton backends only")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("FASTMATH_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    include_dirs, library_dirs = nvidia_wheel_dirs()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    log(
        f"building fastmath_kernels._C from {len(sources)} sources for {archs} "
        f"with CUDA_HOME={os.environ['CUDA_HOME']}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}"
    )
    extension = CUDAExtension(
        name="fastmath_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + gencode_flags(archs),
        },
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**cuda_extension_kwargs())
