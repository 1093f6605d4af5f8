"""One tensor-parallel rank's share of a model, decoded on one GPU with no communication.

    python benchmarks/rank_share.py --tp 2 --points 24x2048 128x2048 --out share.json

A TP rank of `paper` holds 1/tp of the attention heads and of every expert's hidden columns, and
runs the same kernels as one GPU on those shapes, plus two all-reduces per layer and the logits
broadcast. Timing that share alone (`masep bench decode` on a model of those shapes, CUDA graphs,
fused kernels) against the TP plan's own TPOT splits the plan's distance from its floor into the
kernels' part and the communication's part. Rows are `masep bench decode` rows (their floor is
the share's own bytes and FLOPs) with `tp` and `share_of` added.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from masep.config import preset
from masep.model import build_model
from masep.perf.bench import (bench_decode, decode_point, device_meta, free_cuda, measure_copy_bandwidth,
                              measure_matmul_flops)


def share_config(name: str, tp: int, context: int):
    cfg = preset(name)
    for field in ("num_heads", "num_kv_heads", "expert_hidden"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"{name}: {field}={getattr(cfg, field)} does not split over tp={tp}")
    return cfg.replace(name=f"{name}-tp{tp}-share", num_heads=cfg.num_heads // tp,
                       num_kv_heads=cfg.num_kv_heads // tp, expert_hidden=cfg.expert_hidden // tp,
                       max_seq_len=context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--tp", type=int, default=2, help="the TP degree whose rank share is timed (>= 1)")
    parser.add_argument("--points", type=decode_point, nargs="+", default=[(24, 2048), (128, 2048)])
    parser.add_argument("--impl", default="auto+fused")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.tp < 1:
        parser.error(f"--tp {args.tp}: must be >= 1")
    try:  # every point's shape checked before any GPU work
        configs = [share_config(args.preset, args.tp, context) for _, context in args.points]
    except ValueError as err:
        parser.error(str(err))
    copy_bw, matmul = measure_copy_bandwidth(), measure_matmul_flops()
    rows = []
    for (batch, context), cfg in zip(args.points, configs):
        model = build_model(cfg, seed=0, device="cuda", dtype=cfg.torch_dtype)
        row = bench_decode(cfg.name, batch, context, model=model, impl=args.impl, steps=args.steps,
                           copy_bw=copy_bw, matmul_flops=matmul)
        rows.append(row | dict(tp=args.tp, share_of=args.preset))
        del model
        free_cuda()
    Path(args.out).write_text(json.dumps(dict(meta=device_meta(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
