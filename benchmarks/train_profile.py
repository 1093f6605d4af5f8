"""Where a masep training step's time goes on one GPU, beside a plain PyTorch loop.

    python benchmarks/train_profile.py --out DIR [--preset paper --layers 2 --seq-len 512 --batch 8]

Runs the `single` plan's Trainer in this process and times each phase of a step with CUDA
events (forward + backward, gradient sync, optimizer with the norm, step statistics), counts
the host synchronisations (device-to-host copies and stream syncs) with torch.profiler, and
lists the ops with the most GPU and CPU time. Writes DIR/train_profile_<hw>_<yyyymmdd>.json and
the profiler tables as .txt.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace

import torch


class _Mark:
    """A point in GPU time (a CUDA event) or, on CPU, in host time."""

    def __init__(self, cuda: bool):
        import time
        self.cuda = cuda
        if cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t = time.perf_counter()

    def ms_until(self, other: "_Mark") -> float:
        if self.cuda:
            other.ev.synchronize()
            return self.ev.elapsed_time(other.ev)
        return (other.t - self.t) * 1e3


def phase_times(trainer, steps: int) -> dict[str, float]:
    """Mean ms per phase over `steps` steps (the phases of Trainer.train_step, in its order)."""
    from masep.train.syncer import world_sum
    names = ("data", "forward_backward", "grad_sync", "optimizer", "statistics")
    total = dict.fromkeys(names, 0.0)
    env = trainer.env
    cuda = env.device.type == "cuda"
    for _ in range(steps):
        ev = [_Mark(cuda)]
        batch = trainer.batches.next_batch().to(env.device)
        trainer.mp.zero_grad()
        scale = trainer.mp.loss_scale()
        ev.append(_Mark(cuda))
        from masep.train.trainer import rank_rows
        stats = trainer.rank.step(rank_rows(trainer.rank, trainer.plan, batch), trainer.shape, trainer.step_index,
                                  scale)
        ev.append(_Mark(cuda))
        trainer.syncer.sync()
        ev.append(_Mark(cuda))
        trainer.mp.step(None, lambda _l: world_sum((trainer.syncer.local_norm_sq() / scale ** 2).to(env.device),
                                                  env.timeout, "norm").cpu())
        ev.append(_Mark(cuda))
        world_sum(torch.tensor([stats.token_loss, stats.balance, stats.zloss], dtype=torch.float64,
                               device=env.device), env.timeout, "stats").cpu()
        trainer._expert_load(stats)
        ev.append(_Mark(cuda))
        trainer.step_index += 1
        for i, n in enumerate(names):
            total[n] += ev[i].ms_until(ev[i + 1]) / steps
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="paper")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    from masep.config import preset
    from masep.model import build_model
    from masep.parallel.training import SingleTrain
    from masep.plan import SinglePlan
    from masep.train.losses import LossConfig
    from masep.train.optim import OptimConfig
    from masep.train.trainer import Trainer, TrainSpec
    cfg = preset(args.preset).replace(num_layers=args.layers, name=f"{args.preset}-{args.layers}l")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (args.batch * 64, args.seq_len + 1), generator=gen)
    spec = TrainSpec(plan=SinglePlan(), windows=windows, config=cfg, precision="bf16" if dev.type == "cuda" else "fp32", steps=100,
                     batch_size=args.batch, optim=OptimConfig(lr=1e-4, warmup_steps=1, total_steps=100),
                     loss=LossConfig(0.01, 0.0), device=args.device, quiet=True)
    env = SimpleNamespace(rank=0, world_size=1, device=dev, timeout=timedelta(seconds=120))
    model = build_model(cfg, seed=0, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).train()
    trainer = Trainer(spec, SingleTrain(model), env, cfg)
    for _ in range(3):  # warm-up: allocator, kernels
        trainer.train_step()
    phases = phase_times(trainer, args.steps)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            trainer.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = {e.key: e.count // 2 for e in events
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
                          "aten::_local_scalar_dense", "cudaMemcpyAsync", "aten::nonzero", "aten::repeat_interleave")}
    gpu_table = events.table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total",
                             row_limit=30)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    hw = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    stem = Path(args.out) / f"train_profile_{'h200' if 'H200' in hw else hw.split()[0].lower()}_{date.today().strftime('%Y%m%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(meta=dict(hardware=hw, torch=torch.__version__, date=str(date.today()), model=cfg.name,
                         seq_len=args.seq_len, batch=args.batch, steps_timed=args.steps),
               phases_ms=phases, step_ms=sum(phases.values()), host_sync_calls_per_step=syncs)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".txt").write_text("GPU time\n" + gpu_table + "\n\nCPU time\n" + cpu_table + "\n")
    print(json.dumps(doc, indent=1))
    print(gpu_table)
    print(cpu_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
