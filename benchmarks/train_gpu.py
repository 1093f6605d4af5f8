"""Training throughput on one and two GPUs: masep train per strategy, beside a plain PyTorch loop.

    python benchmarks/train_gpu.py --out DIR [--preset paper] [--seq-len 512] [--batch 8] [--steps 8]

Each row: strategy, GPUs, precision, gradient compression, tokens/s and MFU over the timed steps
(the first `--warmup` steps are dropped: NCCL builds its communicators and kernels compile there),
step time from CUDA events (masep.train.trainer), peak memory of rank 0. The reference is the same
model trained by a plain single-GPU loop: model(ids) -> cross-entropy -> backward -> fused AdamW on
bf16 weights (no master weights: the cheapest loop PyTorch offers, so it bounds masep single from
below on memory and above on speed). Data: random token windows (throughput does not depend on
the text). Writes DIR/train_<hw>_<yyyymmdd>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import date
from pathlib import Path

import torch


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        out["triton"] = __import__("triton").__version__
    except ImportError:
        out["triton"] = None
    return out


def plain_loop(cfg, windows, batch: int, steps: int, warmup: int) -> dict:
    import torch.nn.functional as F
    from masep.model import build_model
    from masep.train.log import peak_flops, train_flops_per_token
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, seed=0, device="cuda", dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for step in range(steps):
        ids = windows[step * batch:(step + 1) * batch].cuda()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev[1].record()
        ev[1].synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    tokens = batch * (windows.shape[1] - 1)
    tps = tokens * len(times[warmup:]) / sum(times[warmup:])
    flops = train_flops_per_token(cfg, windows.shape[1] - 1)
    peak = peak_flops(torch.device("cuda", 0))
    row = dict(strategy="plain PyTorch loop", gpus=1, precision="bf16 (no masters)", compression="none",
               tokens_per_s=tps, mfu=flops * tps / peak if peak else None, step_ms=1e3 * tokens / tps,
               peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9, final_loss=float(loss.detach()))
    del model, opt
    torch.cuda.empty_cache()
    return row


def masep_row(name: str, plan, cfg, windows, args, compression: str = "none") -> dict:
    from masep.train.losses import LossConfig
    from masep.train.optim import OptimConfig
    from masep.train.log import peak_flops, train_flops_per_token
    from masep.train.trainer import TrainSpec, launch_training
    spec = TrainSpec(plan=plan, windows=windows, config=cfg, precision="bf16", steps=args.steps,
                     batch_size=args.batch, optim=OptimConfig(lr=1e-4, warmup_steps=1, total_steps=args.steps + 1),
                     loss=LossConfig(0.01, 0.0), grad_compression=compression, device="cuda", quiet=True,
                     timeout_s=120)
    report = launch_training(spec)
    timed = report["history"][args.warmup:]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    tps = tokens / seconds
    flops = train_flops_per_token(cfg, windows.shape[1] - 1)
    peak = peak_flops(torch.device("cuda", 0))
    last = report["history"][-1]
    return dict(strategy=name, gpus=plan.world_size, precision="bf16 + fp32 masters", compression=compression,
                tokens_per_s=tps, mfu=flops * tps / (peak * plan.world_size) if peak else None,
                step_ms=1e3 * seconds / len(timed), final_loss=last["loss"],
                grad_sync_started_in_backward=last.get("grad_sync_overlapped"),
                grad_bytes_ratio=(last["grad_bytes_sent"] / last["grad_bytes_uncompressed"]
                                  if last["grad_bytes_uncompressed"] else None),
                memory_rank0_gb=report["memory"]["total"] / 1e9 if report.get("memory") else None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=None,
                   help="train the preset with this many layers (paper: 9.1 B parameters x 16 bytes of training "
                        "state do not fit one H200; 2 layers do)")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these strategies: single, separated, tp_pp, ep, plain (the PyTorch loop)")
    args = p.parse_args()
    from masep.plan import EpPlan, SeparatedPlan, SinglePlan, TpPpPlan, format_plan
    from masep.config import preset
    cfg = preset(args.preset)
    if args.layers:
        cfg = cfg.replace(name=f"{cfg.name}-{args.layers}l", num_layers=args.layers)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (args.batch * (args.steps + 1), args.seq_len + 1), generator=gen)
    gpus = torch.cuda.device_count()
    # The plain loop runs last: its allocator cache would stay in this process beside the ranks.
    plans = [(SinglePlan(), "none"), (SeparatedPlan(1, 1, 1, 1), "none"), (SeparatedPlan(1, 1, 1, 2), "none"),
             (TpPpPlan(2, 1, 1), "none"), (EpPlan(2, 2), "none"), (EpPlan(2, 2), "int8")]
    configs = [(format_plan(plan), plan, plan.world_size, comp) for plan, comp in plans] + [("plain", None, 1, "none")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = torch.cuda.get_device_name(0)
    meta = dict(hardware=hw, gpus_visible=gpus, versions=versions(), date=str(date.today()), preset=args.preset,
                model=cfg.name, layers=cfg.num_layers,
                seq_len=args.seq_len, batch=args.batch, steps=args.steps, warmup_steps_dropped=args.warmup)
    rows = []
    for name, plan, need, comp in configs:
        if args.only and (plan.strategy if plan is not None else "plain") not in args.only:
            continue
        if need > gpus:
            continue
        t0 = time.time()
        try:
            row = plain_loop(cfg, windows, args.batch, args.steps, args.warmup) if plan is None else \
                masep_row(name, plan, cfg, windows, args, comp)
        except Exception as err:  # a row that fails is reported, the others still run
            row = dict(strategy=name, gpus=need, compression=comp, error=f"{type(err).__name__}: {err}"[:500])
            traceback.print_exc()
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        stamp = date.today().strftime("%Y%m%d")
        (out / f"train_h200_{stamp}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Training throughput, {cfg.name}, bf16, {hw} x{gpus}, {meta['date']}", "",
             f"seq_len {args.seq_len}, {args.batch} sequences per step, {args.steps} steps ({args.warmup} dropped); "
             f"torch {meta['versions']['torch']}, CUDA {meta['versions']['cuda']}", "",
             "| strategy | GPUs | compression | tokens/s | MFU | step ms | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['gpus']} | {r['compression']} | - | - | - | {r['error'][:120]} |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            lines.append(f"| {r['strategy']} | {r['gpus']} | {r['compression']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                         f"{r['step_ms']:.1f} | {r['precision']} |")
    stamp = date.today().strftime("%Y%m%d")
    (out / f"train_h200_{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
