"""The one shape of every command's `--json` output: `{"meta": {...}, "rows": [...]}`.

`rows` holds the results, one object per measured or simulated point (a run's timed round, a
plan, a sweep point, a training step, an op), with the metric names of `vllm bench serve`
where they measure the same thing (`duration` in seconds, `completed`, `request_throughput`,
`output_throughput`, `total_token_throughput`, `mean_ttft_ms`, `median_tpot_ms`, `p99_itl_ms`,
...) and the unit in every other name (`_ms`, `_s`, `_gb`). `meta` says what produced them:
`command`, `date` (local ISO time), `versions` (masep, torch, python), `args` (the parsed
command line), and where they apply `model` (the model config, or at least its `name`) and
`hardware` (a device or a simulated profile), plus what a command adds (the plan, totals).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys

# parsed-argument attributes that are not flags: the handler, parser objects, bookkeeping sets
_NOT_FLAGS = {"handler", "subparser", "func", "given", "config_given", "rest"}


def versions() -> dict:
    from . import __version__
    torch = sys.modules.get("torch")
    return dict(masep=__version__, torch=getattr(torch, "__version__", None), python=platform.python_version())


def _plain(value):
    """JSON-safe: inf/NaN as strings (strict JSON has neither), tuples and sets as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def args_dict(args: argparse.Namespace | dict | None) -> dict:
    if args is None:
        return {}
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    return {k: _plain(v) for k, v in items if k not in _NOT_FLAGS and not k.startswith("_")}


def document(command: str, rows: list[dict], args=None, *, model: dict | str | None = None,
             hardware: dict | None = None, **extra) -> dict:
    """The `--json` document of `command` (e.g. "run", "bench dist"). `model`: a config dict, or
    a name; `extra`: more meta fields."""
    if isinstance(model, str):
        model = {"name": model}
    meta = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), versions=versions(),
                args=args_dict(args))
    if model is not None:
        meta["model"] = model
    if hardware is not None:
        meta["hardware"] = hardware
    meta.update(extra)
    return {"meta": meta, "rows": list(rows)}


def device_info(device: str, backend: str | None = None) -> dict:
    """`hardware` of a measured run: the device kind, its name (the GPU's), the backend."""
    name = "cpu"
    if device == "cuda":
        import torch
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (none visible)"
    out = dict(device=device, device_name=name)
    if backend is not None:
        out["backend"] = backend
    return out


def profile_info(hw, gpus: int | None = None) -> dict:
    """`hardware` of a simulated command: the profile and how many GPUs it is planned for."""
    out = dict(profile=hw.name, source=hw.source)
    if gpus is not None:
        out["gpus"] = gpus
    return out
