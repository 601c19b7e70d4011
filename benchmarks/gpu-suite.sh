#!/usr/bin/env bash
# The one-call GPU suite (see benchmarks/gpu_suite.py): CUDA tests and GPU benchmarks in about 8 minutes.
#   bash benchmarks/gpu-suite.sh OUT_DIR [--dry-run] [--wheels DIR] [--budget-s 480] [--only NAME,...]
# Uses $PYTHON, else the checkout's .venv, else python3: whichever has the machine's torch.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
exec "$python" "$repo/benchmarks/gpu_suite.py" "$@"
