#!/usr/bin/env bash
# Scaling and failover on one lent N-GPU host (N = 4 or 8), each phase within the device tool's
# 10 minutes a call. The commands behind scaling_h200x4_20261130* and failover_*_h200x4_20261130*, as phases:
#   bash benchmarks/run_scaling.sh small OUT         # 1 and 2 GPUs, paper and paper-swiglu (~4 min)
#   bash benchmarks/run_scaling.sh all OUT PRESET    # all N GPUs, one preset, every strategy and ratio
#                                                    # (multi_gpu.py --all-ratios; ~2 min at N = 4)
#   bash benchmarks/run_scaling.sh failover OUT      # the NCCL failover tests (3+ GPUs), then
#                                                    # benchmarks/failover_serve.py under bench serve
# then, here: copy OUT's files to benchmarks/results/scaling_<host>_<date>_{1gpu.json,2gpu.jsonl,
# <N>gpu.jsonl} and run benchmarks/scaling_report.py --tag <host>_<date> --predictions FILES (every
# predict_scaling file written before the run: on 8 GPUs both predict_scaling_h200_20261130*.json).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
phase="${1:?usage: run_scaling.sh small|all|failover OUT [PRESET]}"
out="${2:?usage: run_scaling.sh small|all|failover OUT [PRESET]}"
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
points=(24x2048 128x2048 512x2048 2048x512)
mg() {  # mg NPROC DIR SECONDS PRESETS...: every plan of NPROC GPUs (a plan's points share its model and groups)
  local n=$1 dir=$2 limit=$3; shift 3
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "$limit" torchrun --nproc-per-node "$n" benchmarks/multi_gpu.py \
    --out "$dir" --hardware h200 --presets "$@" --points "${points[@]}" --impls fast --steps 40 --no-check \
    --no-trace --all-ratios 2>&1 | grep -v "^W1\|Warning\|warn(" > "$dir.log"
}
if [ "$phase" = small ]; then
  (nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv; nvidia-smi topo -m
   python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
   date -u) > "$out/gpus.txt" 2>&1
  for m in paper paper-swiglu; do
    for p in "${points[@]}"; do
      CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m masep bench decode --preset "$m" --batch "${p%x*}" \
        --context "${p#*x}" --impl triton+fused --steps 40 --out "$out/one_${m}_$p.json" 2>&1 | grep -v "^W1" | tail -1
    done
  done
  mg 2 "$out/mg2" 300 paper paper-swiglu
  wc -l "$out"/mg2/multi_gpu.jsonl
elif [ "$phase" = all ]; then
  mg "$gpus" "$out/mg$gpus" 540 "${3:?usage: run_scaling.sh all OUT PRESET}"
  wc -l "$out/mg$gpus/multi_gpu.jsonl"
else
  timeout 330 python3 -m pytest -v -s -p no:cacheprovider tests/test_failover_nccl.py 2>&1 \
    | grep -v "^W1\|^\[rank\|^E  \+File\|^E  \+\^" > "$out/failover_nccl.txt"
  grep -E "PASSED|FAILED|passed|failed" "$out/failover_nccl.txt"
  # tiny fp32: the identity check; --output-len within tiny's 256 positions
  timeout 200 python3 benchmarks/failover_serve.py --out "$out" --device cuda --preset tiny --dtype float32 \
    --num-prompts 64 --input-len 32 --output-len 200 --request-rate 16 2>&1 | tail -12
fi
