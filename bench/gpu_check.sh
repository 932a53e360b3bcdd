#!/usr/bin/env bash
# The one script to run on a machine with a CUDA GPU: builds the extension there, runs the
# GPU tests, the trainer at the paper model's shapes (bench/gpu_trainer_run.py) and the kernel
# benchmarks, and leaves logs and tables under $OUT. Steps run in order of importance.
# Budget: under 8 minutes in all (each step has its own timeout).
#   OUT=/some/dir bash bench/gpu_check.sh
# The recipe-scale figures alone (fused-linear time and memory, token_logprobs bandwidth):
#   GPU_CHECK_OPS="linear_cross_entropy grpo_loss token_logprobs" \
#   GPU_CHECK_BENCH_ARGS="--tokens 16384 --without torch.compile trl" OUT=... bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
# Where the trainer run writes its model directory (a few GB): the disk, not a RAM-backed /tmp.
export FASTMATH_SCRATCH=${FASTMATH_SCRATCH:-$PWD}
mkdir -p "$OUT"
# A machine without a package index gets missing packages as wheels in .whl/ (the trainer's
# datasets and math-verify, the Liger-Kernel and cut-cross-entropy peers; pyarrow only where the
# installed one is older than datasets needs): pip download --no-deps --only-binary=:all: -d .whl ...
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl > /dev/null 2>&1; then
  wheels=(.whl/*.whl)
  python -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
    || wheels+=(.whl/pyarrow/*.whl)
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
unset TRITON_INTERPRET FASTMATH_BACKEND
summary="$OUT/summary.txt"
: > "$summary"

deadline=$(( $(date +%s) + ${GPU_CHECK_BUDGET_S:-460} ))  # the whole script stays under 8 minutes

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND, logs to $OUT/NAME.log, records rc and time
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  local left=$(( deadline - start ))
  if [ "$left" -lt 10 ]; then echo "$name: skipped, time budget spent" | tee -a "$summary"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$summary"
  tail -n 3 "$OUT/$name.log"
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
  nvcc --version | tail -n 1
  python -c "
import importlib.metadata as metadata
def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return 'absent'
print(' | '.join(f'{p} {version(p)}' for p in ('transformers', 'datasets', 'math-verify', 'pyarrow', 'liger-kernel',
                                                'cut-cross-entropy', 'trl')))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# sm_90 machine code only: the PTX copy is for newer GPUs and only lengthens this build.
MAX_JOBS=${MAX_JOBS:-16} FASTMATH_CUDA_ARCHS=${FASTMATH_CUDA_ARCHS:-9.0} \
  step build 180 python setup.py build_ext --inplace || echo "build failed; the Triton backend is still tested and timed"
step import 30 python -c "import fastmath_kernels as f; print(f.available_backends(), f.HAS_CUDA_EXT); assert f.HAS_CUDA_EXT and 'cuda' in f.available_backends()"
# Trainer tests need packages a bare GPU machine may lack; their collection errors must not stop the kernel tests.
step pytest_gpu 150 python -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/pytest_gpu.xml" ${GPU_CHECK_TESTS:-tests}
# The trainer on one GPU: packed SFT rows and GRPO with HF rollouts at the 14B model's shapes.
step trainer_run "${GPU_CHECK_TRAINER_TIMEOUT_S:-200}" python -m bench.gpu_trainer_run --out "$OUT/bench" \
  ${GPU_CHECK_TRAINER_ARGS:-}
# GPU_CHECK_OPS picks benchmarks; GPU_CHECK_BENCH_ARGS narrows them (e.g. --tokens 16384 --without torch.compile).
for op in ${GPU_CHECK_OPS:-linear_cross_entropy linear_token_logprobs grpo_loss token_logprobs group_advantages}; do
  step "bench_$op" "${GPU_CHECK_BENCH_TIMEOUT_S:-120}" python -m bench --device cuda --only "$op" --out "$OUT/bench" \
    ${GPU_CHECK_BENCH_ARGS:-}
done
step weight_grad_accumulation 60 python -m bench.weight_grad_accumulation --device cuda --out "$OUT/bench"
echo "logs and tables in $OUT"
