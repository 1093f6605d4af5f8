#!/usr/bin/env bash
# The one-GPU decode benchmark, the transformers peer, the per-rank calibration and a kernel
# profile, as run on the lent H100/H200 (torch, triton and transformers preinstalled; no network).
#   bash benchmarks/run_gpu.sh [OUT_DIR]
# Results land in OUT_DIR (default benchmarks/results): decode_<hw>_<yyyymmdd>.json|md,
# calibration_<hw>_<yyyymmdd>.json, profile_*.txt and the log bench.log. Each stage runs in its
# own process, so a crash in one loses only that stage. `--stage hfprofile` profiles one transformers
# decode step per experts implementation (profile_transformers_b1.txt).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$out/bench.log"
for stage in decode calibrate profile; do
  python3 benchmarks/bench_decode.py --out "$out" --stage "$stage" 2>&1 | tee -a "$out/bench.log"
done
