# Sourced by the benchmarks/run_*.sh scripts: run from the repository root, unbuffered Python
# that imports this checkout, and NVLink multicast off in NCCL, PyTorch and NVSHMEM (on a
# shared host a program that uses it can put every GPU of the host out of service).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
