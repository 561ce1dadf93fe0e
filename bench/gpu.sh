#!/usr/bin/env bash
# The GPU check of issue 16 in one bounded run: the trainer per model (s/epoch, images/s, peak
# memory), channels_last / bf16 autocast / torch.compile (and CUDA graphs) on a 15-epoch v0 run,
# and how many trainer processes share the GPU. What it measures: bench/gpu_check.py.
#
#   bench/gpu.sh DATA_DIR [options]   on a CUDA machine (torch only: no Ray, MLflow, torchvision or
#                                     network); ends within 8 minutes (GPU_CHECK_BUDGET=450 s + margin)
#   bench/gpu.sh --smoke              on any CPU: tiny synthetic data, 1 epoch (checks the script)
#   bench/gpu.sh --synthetic          speed figures on full-size synthetic digits, when no MNIST is at hand
#
# DATA_DIR (or --data-dir, or MNISTJOBS_DATA_DIR) holds the four MNIST IDX files. Figures go to
# $OUT (default bench/out/gpu-check, git-ignored): gpu_check.json (after every section) and gpu_check.txt (tables).
# Python: $PYTHON, else python3 when it has torch, else this checkout's .venv.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$repo/bench/out/gpu-check}
budget=${GPU_CHECK_BUDGET:-450}
py=${PYTHON:-}
if [ -z "$py" ]; then
  if command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then py=python3
  elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
  else echo "error: no Python with torch (set PYTHON=/path/to/python)" >&2; exit 2; fi
fi
args=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then args+=(--data-dir "$1"); shift; fi
mkdir -p "$out"
# the check keeps to its budget section by section; timeout is the backstop, the JSON written so far stays
exec timeout --kill-after=10 "$((${budget%.*} + 20))" "$py" "$repo/bench/gpu_check.py" \
  --out "$out" --budget "$budget" ${args[@]+"${args[@]}"} "$@"
