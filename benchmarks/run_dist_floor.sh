#!/usr/bin/env bash
# Decode at each plan's floor on a 2-GPU host: the issue's points (batch 24/128/512 at context
# 2048, batch 2048 at context 512), one GPU and every 2-GPU strategy, CUDA-event times, the
# plan's floor and NVML energy per row. Two phases, each under the device tool's 10 minutes:
#   bash benchmarks/run_dist_floor.sh one OUT   # CUDA tests + one-GPU rows (masep bench decode)
#   bash benchmarks/run_dist_floor.sh two OUT   # every 2-GPU strategy (benchmarks/multi_gpu.py)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
phase="${1:?usage: run_dist_floor.sh one|two OUT}"
out="${2:?usage: run_dist_floor.sh one|two OUT}"
mkdir -p "$out"
points=(24x2048 128x2048 512x2048 2048x512)
if [ "$phase" = one ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee "$out/gpus.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$out/gpus.txt"
  timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_fastpath.py tests/test_fastpath_dist.py 2>&1 \
    | grep -v "^W1\|^E  \+File\|^E  \+\^" | tail -120 | tee "$out/gpu_tests.txt"
  for p in "${points[@]}" 1024x1024; do
    timeout 120 python3 -m masep bench decode --preset paper --batch "${p%x*}" --context "${p#*x}" \
      --impl triton+fused triton --steps 60 --out "$out/decode_one_gpu_$p.json" 2>&1 | grep -v "^W1" | tail -4
  done
else
  timeout 560 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out "$out/mg" --hardware h200 --presets paper \
    --points "${points[@]}" --impls fast --steps 60 --no-check --no-trace 2>&1 | grep -v "^W1\|Warning\|warn(" \
    | tail -60 | tee "$out/mg_log.txt"
fi
