#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): run from anywhere on the lent GPU machine.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [more gpu_check.py options]
# OUT_DIR defaults to $OUT (the device tool's output folder). The checkout need not be installed:
# gpu_check.py makes it importable as `tessera` and unpacks the wheels carried in .gpu-wheels/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-}}"
if [ -z "$out" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR (or set \$OUT)" >&2
  exit 2
fi
[ "$#" -gt 0 ] && shift
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" --wheels .gpu-wheels "$@"
