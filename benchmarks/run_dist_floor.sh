#!/usr/bin/env bash
# Decode at each plan's floor on a 2-GPU host: the issue's points (batch 24/128/512 at context
# 2048, batch 2048 at context 512), one GPU and every 2-GPU strategy, CUDA-event times, the
# plan's floor and NVML energy per row. Two phases, each under the device tool's 10 minutes:
#   bash benchmarks/run_dist_floor.sh one OUT   # CUDA tests + one-GPU rows (masep bench decode) +
#                                               # decode attention alone (bench_attention.py)
#   bash benchmarks/run_dist_floor.sh two OUT   # every 2-GPU strategy at m = 1 and 2 (benchmarks/multi_gpu.py)
#   bash benchmarks/run_dist_floor.sh ab OUT    # the same with and without the fused small-op
#                                               # kernels, then profiler traces at batch 24 and
#                                               # where each rank's GPU time goes (trace_summary.py)
#   bash benchmarks/run_dist_floor.sh graphs OUT  # the 2-GPU CUDA tests (separated whole-step graphs
#                                               # under sync-debug "error", failover over NCCL with
#                                               # handshake-free separated decode steps), then separated
#                                               # plans with and without whole-step graphs
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
usage="usage: run_dist_floor.sh one|two|ab|graphs OUT"
phase="${1:?$usage}"
out="${2:?$usage}"
mkdir -p "$out"
points=(24x2048 128x2048 512x2048 2048x512)
if [ "$phase" = one ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee "$out/gpus.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$out/gpus.txt"
  timeout 270 python3 -m pytest -q -s -p no:cacheprovider tests/test_decode_attention.py tests/test_fastpath.py \
    tests/test_fastpath_dist.py 2>&1 \
    | grep -v "^W1\|^E  \+File\|^E  \+\^" | tail -120 | tee "$out/gpu_tests.txt"
  for p in "${points[@]}"; do
    timeout 90 python3 -m masep bench decode --preset paper --batch "${p%x*}" --context "${p#*x}" \
      --impl auto+fused --steps 60 --out "$out/decode_one_gpu_$p.json" 2>&1 | grep -v "^W1" | tail -4
  done
  timeout 120 python3 benchmarks/bench_attention.py --out "$out/attention.json" 2>&1 | grep -v "^W1" | tail -20
elif [ "$phase" = ab ]; then
  timeout 330 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out "$out/ab" --hardware h200 --presets paper \
    --points "${points[@]}" --impls fast fast-unfused --steps 60 --no-check --no-trace 2>&1 \
    | grep -v "^W1\|Warning\|warn(" | tail -40 | tee "$out/ab_log.txt"
  timeout 200 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out "$out/tr" --hardware h200 --presets paper \
    --points 24x2048 --impls fast --steps 20 --no-check 2>&1 | grep -v "^W1\|Warning\|warn(" | tail -20
  (cd "$out/tr" && tar xzf traces.tar.gz && python3 "$OLDPWD/benchmarks/trace_summary.py" traces/*/rank*.json \
    --last-ms 40 | tee "$out/trace_summary.jsonl" && rm -rf traces traces.tar.gz)
elif [ "$phase" = graphs ]; then
  timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_fastpath_dist.py tests/test_failover_nccl.py 2>&1 \
    | grep -v "^W1\|^E  \+File\|^E  \+\^" | tail -80 | tee "$out/gpu_tests.txt"
  timeout 260 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out "$out/sg" --hardware h200 --presets paper \
    --points "${points[@]}" --impls fast fast-stepgraphs --plan-filter sep --microbatches 2 --steps 60 --no-check \
    --no-trace 2>&1 | grep -v "^W1\|Warning\|warn(" | tail -40 | tee "$out/sg_log.txt"
else
  timeout 560 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --out "$out/mg" --hardware h200 --presets paper \
    --points "${points[@]}" --impls fast --microbatches 1 2 --steps 60 --no-check --no-trace 2>&1 | grep -v "^W1\|Warning\|warn(" \
    | tail -60 | tee "$out/mg_log.txt"
fi
