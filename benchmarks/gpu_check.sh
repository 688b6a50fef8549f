#!/usr/bin/env bash
# GPU check of MTP decoding (benchmarks/gpu_check.py) on one CUDA GPU, sized for under 8 minutes:
# exactness on the device (eager and compiled), per-pass cost and tokens/s of `ar` vs `static` k in
# {2, 4, 8, 16} on a Llama-3.2-1B-shaped random model in bf16 at batch 1, 8 and 32, and the compiled
# path (compile=True: static cache + CUDA graphs) for `ar` and `static` k=8 at batch 1 and 8. The
# report is rewritten after every section, so a run cut short by the timeout keeps what it measured.
# No hub access needed.
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu_check.md
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --batch-sizes 1,8
#
# Uses `python` from PATH (or $PYTHON), which must already have torch (a CUDA build), transformers
# and this package's light dependencies (stevedore, pluggy, ...). The package itself is installed
# (`pip install --no-deps -e .`) only if it is not usable yet: the engine finds its strategies
# through entry points, so importing the source tree alone is not enough. On an offline machine
# without hatchling, set MTP_WHEELS to a folder of wheels (`pip wheel --no-deps .` and any missing
# dependencies) to install them with --no-index instead. Extra arguments go to gpu_check.py.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
py=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The working tree's code runs even where an older copy of the package is installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

usable() {  # importable and its built-in strategies registered
  (cd / && "$py" -c "from mtp_plugins.registry import load_decoder; load_decoder('static')") >/dev/null 2>&1
}

if ! usable; then
  if [[ -n "${MTP_WHEELS:-}" ]]; then
    echo "gpu_check.sh: installing the wheels in $MTP_WHEELS (--no-index --no-deps)" >&2
    "$py" -m pip install --quiet --no-index --no-deps "$MTP_WHEELS"/*.whl
  fi
fi
if ! usable; then
  flags=(--quiet --no-deps -e .)
  # Offline, pip cannot fetch the build backend into an isolated build: use the installed one.
  if "$py" -c "import hatchling" >/dev/null 2>&1; then flags=(--no-build-isolation "${flags[@]}"); fi
  echo "gpu_check.sh: pip install ${flags[*]}" >&2
  "$py" -m pip install "${flags[@]}"
fi
if ! usable; then
  echo "gpu_check.sh: mtp_plugins is still not usable with $py:" >&2
  (cd / && "$py" -c "from mtp_plugins.registry import load_decoder; load_decoder('static')") || true
  exit 1
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader || true
fi
mkdir -p benchmarks/results
timeout -k 10 470 "$py" benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md "$@"
