"""What a user sees while training: a progress bar, log lines, train.jsonl and loss.png (rank 0).

MFU = model FLOPs per second / (peak dense bf16 FLOP/s x GPUs). Model FLOPs per token of a
training step = 3 x forward (backward costs two forwards), forward = 2 x the matmul weights a
token passes through (attention projections, the k routed experts, shared expert, router,
LM head) + 4 x layers x hidden x the mean attended context (QK^T and AV, causal: (L+1)/2).
Peak: the GPU's spec sheet (perf/hardware.py); none on CPU, where MFU is not reported.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..logs import progress

log = logging.getLogger("masep.train")


def train_flops_per_token(cfg, seq_len: int) -> float:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    expert = (3 if cfg.expert_act == "swiglu" else 2) * h * cfg.expert_hidden * cfg.top_k
    shared = 3 * h * cfg.shared_expert_hidden + h if cfg.shared_expert_hidden else 0
    per_layer = attn + expert + shared + h * cfg.num_experts
    forward = 2 * (cfg.num_layers * per_layer + h * cfg.vocab_size)
    forward += 4 * cfg.num_layers * cfg.num_heads * d * (seq_len + 1) / 2
    return 3.0 * forward


def peak_flops(device: torch.device) -> float | None:
    """Spec dense bf16 FLOP/s of one GPU of this kind (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    from ..perf.hardware import PROFILES
    name = torch.cuda.get_device_name(device).lower()
    for key, hw in PROFILES.items():
        if key in name:
            return hw.matmul_flops_per_s
    return None


class TrainLog:
    def __init__(self, spec, rank: int, trainer, start_step: int = 0):
        self.spec, self.active = spec, rank == 0
        self.flops_token = train_flops_per_token(trainer.cfg, spec.windows.shape[1] - 1)
        self.peak = peak_flops(trainer.env.device)
        self.gpus = trainer.env.world_size
        self.rows: list[dict] = []
        self.file = self.bar = None
        if not self.active:
            return
        if spec.log_dir:
            Path(spec.log_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(spec.log_dir) / "train.jsonl", "a" if spec.resume else "w")
        mem = trainer.memory()
        log.info("rank 0 holds %s parameters; training state %.3f GB (%.0f bytes/param without gradients, %s)",
                 f"{mem['num_params']:,}", mem["total"] / 1e9, mem["bytes_per_param"]["total_without_grads"],
                 spec.precision)
        if not spec.quiet:
            self.bar = progress(spec.steps, "train", "step", initial=start_step, delay=0)

    def step(self, row: dict) -> None:
        if not self.active:
            return
        row = dict(row, mfu=(self.flops_token * row["tokens_per_s"] / (self.peak * self.gpus)) if self.peak else None)
        self.rows.append(row)
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm']:.2f}",
                                 tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> Path | None:
        """Close the bar and train.jsonl; draw loss.png. Its path, or None where none was drawn."""
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.active and self.spec.log_dir and self.rows:
            return plot_losses(Path(self.spec.log_dir) / "train.jsonl", Path(self.spec.log_dir) / "loss.png")
        return None


def _runs(rows: list[dict]) -> list[list[dict]]:
    """train.jsonl cut where the step number goes back: each resumed run is its own line."""
    runs: list[list[dict]] = []
    for r in rows:
        if not runs or r["step"] <= runs[-1][-1]["step"]:
            runs.append([])
        runs[-1].append(r)
    return runs


def plot_losses(jsonl: Path, png: Path) -> Path | None:
    """Loss curve of a train.jsonl (every step of every resumed run); None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    loss_figure(rows).savefig(png, dpi=120)
    return png


def loss_figure(rows: list[dict]):
    """Top: the cross-entropy and the total loss per step; bottom: the router terms the total adds.
    Resumed runs start a new line (a dotted mark where), steps skipped on fp16 overflow are marked red."""
    from ..plotting import new_figure
    fig = new_figure(8, 5.2)
    ax, ax_router = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    runs = _runs(rows)
    for i, run in enumerate(runs):
        steps = [r["step"] for r in run]
        first = i == 0
        ax.plot(steps, [r["token_loss"] for r in run], color="#4C72B0", linewidth=1.6,
                label="cross-entropy" if first else None)
        ax.plot(steps, [r["loss"] for r in run], color="#DD8452", linewidth=1.0, linestyle="--",
                label="total (cross-entropy + router terms)" if first else None)
        ax_router.plot(steps, [r.get("balance_loss", 0.0) for r in run], color="#55A868",
                       label="load-balancing term" if first else None)
        if any(r.get("z_loss") for r in rows):
            ax_router.plot(steps, [r.get("z_loss", 0.0) for r in run], color="#8172B3",
                           label="z-loss term" if first else None)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for j, step in enumerate(skipped):  # fp16 overflow: no update at this step
        ax.axvline(step, color="#C44E52", linewidth=0.8, alpha=0.6, label="skipped step (overflow)" if j == 0 else None)
    for j, run in enumerate(runs[1:]):
        ax.axvline(run[0]["step"], color="gray", linestyle=":", label="resumed here" if j == 0 else None)
    ax.set_ylabel("loss (nats per token)")
    ax_router.set_ylabel("router terms\n(added to the loss)")
    ax_router.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator
    ax_router.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run
    for a in (ax, ax_router):
        a.grid(alpha=0.3)
        a.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, frameon=False)
    resumed = f" in {len(runs)} runs (resumed)" if len(runs) > 1 else ""
    ax.set_title(f"Training loss, steps {rows[0]['step']}-{rows[-1]['step']}{resumed}: cross-entropy "
                 f"{rows[0]['token_loss']:.3f} -> {rows[-1]['token_loss']:.3f}", fontsize=10)
    return fig
