#!/usr/bin/env bash
# The multi-GPU run, as made on a lent N-GPU host (torch, triton preinstalled; no network):
#   bash benchmarks/run_multi_gpu.sh OUT_DIR [multi_gpu.py options...]
# 1. the CUDA tests (tests/test_fastpath*.py: one-GPU fast path, 2-GPU fast path of every
#    strategy against the single-device model) -> OUT_DIR/gpu_tests.txt
# 2. benchmarks/multi_gpu.py over all GPUs (token checks, fast vs eager decode rows with the
#    simulator's predictions) -> OUT_DIR/mg/multi_gpu.jsonl
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:?usage: run_multi_gpu.sh OUT_DIR [multi_gpu.py options]}"
shift
mkdir -p "$out/mg"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$out/gpus.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_fastpath_dist.py 2>&1 \
  | grep -v "^\[rank\|^E  \+File\|^E  \+\^" | tail -150 | tee "$out/gpu_tests.txt"
timeout "${MG_TIMEOUT:-420}" torchrun --nproc-per-node "$gpus" benchmarks/multi_gpu.py --out "$out/mg" "$@" 2>&1 \
  | grep -v "^W1\|Warning\|warn(" | tail -80 | tee "$out/mg/log.txt"
