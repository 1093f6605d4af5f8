"""Expert matmuls at many rows: F.grouped_mm (CUTLASS) against our Triton kernels, on one GPU.

    python benchmarks/bench_grouped_mm.py --out DIR [--points 2048x512 512x2048]

Part 1 times one weight matrix of `paper`'s experts (up: H -> I, down: I -> H) at the row counts
each plan's expert matmul sees at batch 512 and 2048 (one GPU, a TP2 rank's half of every expert,
an EP2 rank's 8 experts, a separated expert rank's micro-batch), with top-2 routing drawn
uniformly. Each row has the FLOPs over the matmul rate and the bytes over the copy bandwidth
measured in the same run; the floor is the larger. Part 2 times whole decode steps of `paper`
with each expert implementation (masep.perf.bench.bench_decode, the rows of bench_decode.py).

Writes DIR/grouped_mm_<hw>_<yyyymmdd>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from masep.config import preset as get_preset
from masep.fastpath import triton_grouped_mm
from masep import grouped_mm_wide as gw
from masep.grouped_mm_wide import tma_applies, wide_grouped_mm
from masep.perf import bench


def log(msg: str) -> None:
    print(msg, flush=True)


def shapes(cfg, batches=(512, 2048)) -> list[dict]:
    """(what, rows, experts, expert hidden) of `paper` plans' expert matmuls at these batches."""
    e, i, k = cfg.num_experts, cfg.expert_hidden, cfg.top_k
    out = []
    for batch in batches:
        pairs = batch * k
        out += [dict(what=f"one GPU, batch {batch}", rows=pairs, experts=e, hidden=i),
                dict(what=f"TP2 rank, batch {batch}", rows=pairs, experts=e, hidden=i // 2),
                dict(what=f"EP2 rank (m=1), batch {batch}", rows=pairs // 2, experts=e // 2, hidden=i),
                dict(what=f"separated expert rank (m=2), batch {batch}", rows=pairs // 2, experts=e, hidden=i)]
    return out


def kernels() -> dict:
    return {"F.grouped_mm": lambda x, w, o: F.grouped_mm(x, w, offs=o),
            "triton decode kernel": triton_grouped_mm,
            "wide, pointers": lambda x, w, o: wide_grouped_mm(x, w, o, tma=False),
            "wide, TMA": lambda x, w, o: wide_grouped_mm(x, w, o, tma=True)}


def time_matrices(cfg, copy_bw: float, flops: float, meta: dict, batches=(512, 2048)) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = cfg.hidden_size
    for s in shapes(cfg, batches):
        e, n = s["experts"], s["rows"]
        picks = torch.rand(n // cfg.top_k, cfg.num_experts, device="cuda", generator=gen).topk(cfg.top_k, -1).indices
        picks = picks.flatten() % e  # an EP rank's share: its experts, drawn alike
        counts = torch.bincount(picks, minlength=e)
        offs = counts.cumsum(0).to(torch.int32)
        for matrix, m, k in (("up", s["hidden"], h), ("down", h, s["hidden"])):
            w = (torch.randn(e, m, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02).transpose(1, 2)
            x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            fl = 2 * n * k * m
            nbytes = (int((counts > 0).sum()) * k * m + n * k + n * m) * 2
            floor_ms = max(fl / flops, nbytes / copy_bw) * 1e3
            ref = F.grouped_mm(x, w, offs=offs).float()
            for name, fn in kernels().items():
                row = {**meta, **s, "matrix": matrix, "M": m, "K": k, "kernel": name, "flop": fl, "bytes": nbytes,
                       "floor_ms": floor_ms, "max_rows_per_expert": int(counts.max())}
                if name == "wide, TMA" and not tma_applies(x, w):
                    continue
                try:
                    err = float((fn(x, w, offs).float() - ref).norm() / ref.norm())
                    ms = bench.time_graph(lambda: fn(x, w, offs))
                    row.update(ms=ms, tflops=fl / ms / 1e9, of_floor=ms / floor_ms, rel_err=err)
                    tuned = {"wide, pointers": gw._wide_ptr, "wide, TMA": gw._wide_tma}.get(name)
                    if tuned is not None:  # the candidate the autotuner kept for this shape
                        row["config"] = str(tuned.best_config)
                    log(f"{s['what']:42} {matrix:4} {name:22} {ms:7.3f} ms  {fl / ms / 1e9:5.0f} TFLOP/s  "
                        f"x{ms / floor_ms:.2f} floor  err {err:.1e} {row.get('config', '')}")
                except Exception as err:  # a kernel that fails here is reported, not fatal
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    log(f"{s['what']:42} {matrix:4} {name:22} failed: {row['error']}")
                rows.append(row)
            w = x = ref = None  # free before the next matrix
            bench.free_cuda()
    return rows


def time_decode(points, impls, copy_bw: float, flops: float) -> list[dict]:
    rows = []
    for batch, context in points:
        model = bench.build_paper_model("paper", context)
        for impl in impls:
            row = bench.bench_decode("paper", batch, context, model=model, impl=impl, steps=50, copy_bw=copy_bw,
                                     matmul_flops=flops, log=log)
            rows.append({**row, "part": "decode step"})
        del model
        bench.free_cuda()
    return rows


def report(rows: list[dict], meta: dict, command: str) -> str:
    lines = [f"# Expert matmuls at many rows, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; `{command}`. Copy bandwidth "
             f"{meta['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul {meta['matmul_flops'] / 1e12:.0f} TFLOP/s (8192^3), "
             "both measured in this run. floor = max(FLOPs / matmul rate, bytes / copy bandwidth); times are "
             "CUDA-graph replays timed by CUDA events.", "",
             "| plan's expert matmul | matrix | rows | kernel | ms | TFLOP/s | x floor | rel. err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("part") == "decode step":
            continue
        if "error" in r:
            lines.append(f"| {r['what']} | {r['matrix']} | {r['rows']} | {r['kernel']} | failed | | | |")
            continue
        lines.append(f"| {r['what']} | {r['matrix']} | {r['rows']} | {r['kernel']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.0f} | {r['of_floor']:.2f} | {r['rel_err']:.1e} |")
    steps = [r for r in rows if r.get("part") == "decode step"]
    if steps:
        lines += ["", "Whole decode steps of `paper` (bench_decode rows):", "",
                  "| batch x context | impl | TPOT ms | x floor |", "|---|---|---|---|"]
        for r in steps:
            ratio = r.get("tpot_over_floor") or (r["tpot_ms_median"] / r["floor_ms"] if r.get("floor_ms") else None)
            lines.append(f"| {r['batch']} x {r['context']} | {r['impl']} | {r['tpot_ms_median']:.2f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", nargs="*", type=bench.decode_point, default=[(2048, 512), (512, 2048)],
                        help="decode points BATCHxCONTEXT for whole steps (none: matrices only)")
    parser.add_argument("--impls", nargs="+", default=["auto+fused", "wide+fused"])
    parser.add_argument("--no-matrices", action="store_true", help="whole decode steps only (part 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 2048], help="part 1's batch sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    copy_bw, flops = bench.measure_copy_bandwidth(), bench.measure_matmul_flops()
    import triton
    meta = {**bench.device_meta(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_bw": copy_bw, "matmul_flops": flops}
    log(json.dumps(meta))
    rows = [] if args.no_matrices else time_matrices(get_preset("paper"), copy_bw, flops, meta, args.batches)
    rows += time_decode(args.points, args.impls, copy_bw, flops)
    command = "python " + " ".join(sys.argv)
    stem = args.out / (f"grouped_mm_{bench.hardware_tag(meta['device'])}_{time.strftime('%Y%m%d')}"
                       + ("_steps" if args.no_matrices else "")
                       + ("" if args.batches == [512, 2048] else "_b" + "_".join(map(str, args.batches))))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "command": command, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(report(rows, meta, command))
    log(f"done in {time.time() - t0:.0f} s: {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
