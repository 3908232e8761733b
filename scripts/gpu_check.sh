#!/usr/bin/env bash
# The GPU checks of the multi-GPU path, ready to run on a machine with CUDA (2 GPUs for the DDP part):
# the `gpu` test tier, then scripts/gpu_check.py (2-GPU DDP collect/edit vs 1 GPU, bf16-mixed and bf16-true
# collection vs float32, eigendecomposition time on the device, collection throughput and peak memory on an
# OLMo-2-1B-shaped model). Prints a JSON report and writes it to $OUT/gpu_check.json.
#   bash scripts/gpu_check.sh            # from the repository root, in the project's environment
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
python -m pytest -m gpu -q -p no:cacheprovider
python scripts/gpu_check.py --out "$OUT"
