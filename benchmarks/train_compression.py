"""Does int8 gradient compression (with error feedback) train as well as no compression?

Two runs of `masep train` that differ only in --grad-compression (same model seed, data order,
learning-rate schedule and plan), on real text, then the loss curves side by side:

    python benchmarks/train_compression.py --windows FILE.pt --out DIR [--preset small] [--steps 400]

FILE.pt holds packed token windows [N, L+1] (masep.train.data.load_corpus; on a machine without
the corpus package, save them elsewhere and carry the file). The plan must replicate gradients
(ep, or separated with several replicas), or there is nothing to compress.

Margin, stated before the runs: the int8 run's mean loss over the last 10% of the steps is
within 1% of the uncompressed run's. Writes DIR/train_compression_<hw>_<yyyymmdd>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

MARGIN = 0.01  # relative difference of the final losses that counts as "the same loss"


def run(args, windows: torch.Tensor, compression: str, device: str) -> dict:
    from masep.plan import EpPlan, SeparatedPlan
    from masep.train.losses import LossConfig
    from masep.train.optim import OptimConfig
    from masep.train.trainer import TrainSpec, launch_training
    plan = EpPlan(args.ranks, 1) if args.strategy == "ep" else SeparatedPlan(args.ranks - 1, 1, 1, 1)
    spec = TrainSpec(plan=plan, windows=windows, preset=args.preset,
                     precision="bf16" if device == "cuda" else "fp32", steps=args.steps, batch_size=args.batch,
                     optim=OptimConfig(lr=args.lr, warmup_steps=args.steps // 20, total_steps=args.steps),
                     loss=LossConfig(0.01, 0.0), grad_compression=compression, gpus_per_node=1, device=device,
                     quiet=True, timeout_s=300)
    report = launch_training(spec)
    h = report["history"]
    tail = h[-max(1, len(h) // 10):]
    last = h[-1]
    from masep.perf.costmodel import describe
    return dict(plan=describe(plan), compression=compression, steps=len(h),
                final_loss=sum(r["token_loss"] for r in tail) / len(tail),
                losses=[round(r["token_loss"], 5) for r in h],
                tokens_per_s=sum(r["tokens_per_s"] for r in h[3:]) / max(1, len(h) - 3),
                grad_bytes_ratio=(last["grad_bytes_sent"] / last["grad_bytes_uncompressed"]
                                  if last["grad_bytes_uncompressed"] else None))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['compression']} (final {r['final_loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=120)


def render(meta: dict, rows: list[dict], stem: Path) -> None:
    """DIR/<stem>.md and .png from the runs' rows."""
    title = f"{meta['preset']}, {rows[0]['plan']}, {meta['batch']}x{meta['seq_len']} tokens/step: int8 vs none"
    plot(rows, stem.with_suffix(".png"), title)
    rel = meta["relative_difference"]
    lines = [f"# Gradient compression on real text: {title}", "",
             f"{meta['hardware']}, torch {meta['torch']}, {meta['date']}; {meta['windows']} windows of Shakespeare's "
             f"works, {meta['steps']} steps, lr {meta['lr']}; margin stated before the run: final losses within "
             f"{meta['margin']:.0%}", "",
             "| compression | final loss (mean of last 10% steps) | gradient bytes vs uncompressed | tokens/s |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['grad_bytes_ratio']:.3f}" if r["grad_bytes_ratio"] else "-"
        lines.append(f"| {r['compression']} | {r['final_loss']:.4f} | {ratio} | {r['tokens_per_s']:,.0f} |")
    lines += ["", f"relative difference {rel:.3%}: {'within' if rel <= meta['margin'] else 'OUTSIDE'} the margin"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", help="torch.save'd token windows [N, L+1]")
    p.add_argument("--out", help="directory for the results")
    p.add_argument("--render", metavar="JSON", help="only redraw the .md and .png of a results file")
    p.add_argument("--preset", default="small")
    p.add_argument("--strategy", choices=("ep", "separated"), default="ep")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        render(doc["meta"], doc["rows"], Path(args.render).with_suffix(""))
        return 0
    if not (args.windows and args.out):
        p.error("--windows and --out are required (or --render JSON)")
    windows = torch.load(args.windows).long()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hw = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    rows = [run(args, windows, c, device) for c in ("none", "int8")]
    rel = abs(rows[1]["final_loss"] - rows[0]["final_loss"]) / rows[0]["final_loss"]
    meta = dict(hardware=hw, torch=torch.__version__, date=str(date.today()), preset=args.preset,
                strategy=args.strategy, ranks=args.ranks, steps=args.steps, batch=args.batch,
                seq_len=windows.shape[1] - 1, windows=windows.shape[0], lr=args.lr, margin=MARGIN,
                relative_difference=rel, within_margin=rel <= MARGIN)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_compression_{'h200' if 'H200' in hw else hw.replace(' ', '_').lower()}_" \
                 f"{date.today().strftime('%Y%m%d')}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    render(meta, rows, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
