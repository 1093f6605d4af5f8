"""Training checkpoints through torch.distributed.checkpoint: each rank writes its own shards.

Layout: <save_dir>/step_<n>/ (a DCP checkpoint) and <save_dir>/latest (the name of the newest).
Keys are prefixed with the rank ("rank3/..."), because a parameter name means a different slice
on each rank (heads, experts): DCP would otherwise take equal keys on two ranks for replicas of
one tensor. So a checkpoint resumes under the same plan; to change plans, export (--export) and
start from the HF checkpoint.

Saved per rank: the rank's weights, the optimizer state (fp32 masters, Adam moments, LR
schedule, loss scale, counters: precision.MixedPrecision.state_dict) and the data position.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def _state(trainer) -> dict:
    return {f"rank{trainer.env.rank}": {
        "model": dict(trainer.rank.named_parameters()),
        "optim": trainer.mp.state_dict(),
        "data": trainer.batches.state_dict(),
        "step": trainer.step_index,
        "world": trainer.env.world_size,
        "plan": trainer.plan.describe(),
    }}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(trainer, save_dir: str) -> Path:
    root = Path(save_dir)
    path = root / f"step_{trainer.step_index}"
    with torch.no_grad():
        dcp.save(_state(trainer), checkpoint_id=str(path))
    _barrier()  # every rank's shards are on disk before `latest` names them
    if trainer.env.rank == 0:
        tmp = root / "latest.tmp"
        tmp.write_text(path.name)
        tmp.replace(root / "latest")
    _barrier()
    return path


def latest(save_dir: str) -> Path:
    root = Path(save_dir)
    marker = root / "latest"
    if not marker.is_file():
        raise FileNotFoundError(f"--resume: {root} holds no checkpoint ({marker} is missing); train once with "
                                "--save-dir first")
    return root / marker.read_text().strip()


def load(trainer, save_dir: str) -> int:
    """Restore a trainer in place from the newest checkpoint; returns the step it resumes at."""
    path = latest(save_dir)
    state = _state(trainer)
    mine = state[f"rank{trainer.env.rank}"]
    expected = (mine["world"], mine["plan"])
    with torch.no_grad():
        dcp.load(state, checkpoint_id=str(path))
    mine = state[f"rank{trainer.env.rank}"]
    if (mine["world"], mine["plan"]) != expected:
        raise ValueError(f"--resume: {path} was written by {mine['plan']!r} on {mine['world']} ranks; this run is "
                         f"{expected[1]!r} on {expected[0]} ranks (resume with the same plan, or export and start "
                         "from the HF checkpoint)")
    trainer.mp.load_state_dict(mine["optim"])
    trainer.batches.load_state_dict(mine["data"])
    trainer.step_index = int(mine["step"])
    return trainer.step_index
