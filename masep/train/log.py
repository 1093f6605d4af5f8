"""What a user sees while training: a progress bar, log lines, train.jsonl and loss.png (rank 0).

MFU = model FLOPs per second / (peak dense bf16 FLOP/s x GPUs). Model FLOPs per token of a
training step = 3 x forward (backward costs two forwards), forward = 2 x the matmul weights a
token passes through (attention projections, the k routed experts, shared expert, router,
LM head) + 4 x layers x hidden x the mean attended context (QK^T and AV, causal: (L+1)/2).
Peak: the GPU's spec sheet (perf/hardware.py); none on CPU, where MFU is not reported.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


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
        if not spec.quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=spec.steps, initial=start_step, unit="step", dynamic_ncols=True)
            mem = trainer.memory()
            self.bar.write(f"rank 0 holds {mem['num_params']:,} parameters; training state "
                           f"{mem['total'] / 1e9:.3f} GB ({mem['bytes_per_param']['total_without_grads']:.0f} "
                           f"bytes/param without gradients, {spec.precision})")

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.active and self.spec.log_dir and self.rows:
            plot_losses(Path(self.spec.log_dir) / "train.jsonl", Path(self.spec.log_dir) / "loss.png")


def plot_losses(jsonl: Path, png: Path) -> Path | None:
    """Loss curve of a train.jsonl (every step of every resumed run); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot([r["step"] for r in rows], [r["token_loss"] for r in rows], label="cross-entropy")
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="total (with router losses)", alpha=0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
