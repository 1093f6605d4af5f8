"""NCCL collective times at the message sizes a decode step moves, for the cost model's constants.

    torchrun --nproc-per-node N benchmarks/comm_latency.py --out FILE.jsonl

For each size (bytes per rank), times `all_to_all_single` with equal splits (what padded
transfers issue) and `all_reduce` (the TP x PP baseline) over all ranks: `iters` back-to-back
collectives between two device synchronisations, median of `repeats`. One JSON row per
(collective, size) with the hardware, versions and date; fit latency + size / bandwidth to them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def time_collective(fn, iters: int, repeats: int, device) -> float:
    """Seconds per collective: `iters` issued back to back, median over `repeats`."""
    fn()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) / iters)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    rows = []
    for size in args.sizes:
        n = max(world, size // 2 // world * world)  # bf16 elements, divisible by the world size
        x, y = torch.randn(n, device=device).bfloat16(), torch.empty(n, device=device, dtype=torch.bfloat16)
        for name, fn in (("all_to_all_single", lambda: dist.all_to_all_single(y, x)),
                         ("all_reduce", lambda: dist.all_reduce(x))):
            t = time_collective(fn, args.iters, args.repeats, device)
            rows.append(dict(collective=name, bytes_per_rank=2 * n, ranks=world, time_us=t * 1e6,
                             device=torch.cuda.get_device_name(device), torch=torch.__version__,
                             nccl=".".join(map(str, torch.cuda.nccl.version())),
                             date=datetime.date.today().isoformat()))
    if rank == 0:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                print(f"{row['collective']:18} {row['bytes_per_rank']:>10} B/rank  {row['time_us']:9.1f} us", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
