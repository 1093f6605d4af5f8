"""Log lines and progress bars: set up once per process, every line tagged with who wrote it.

`masep COMMAND --log-level LEVEL` calls `setup_logging` once: the `masep` loggers write to
stderr as `12:00:01 [front] INFO message`, where `front` is the process that parsed the command
line (and, for a distributed plan, starts and drives the ranks) and `rank 3` a model rank. A
rank finds its number in the launch's world (torch.distributed) or, before it has joined it, in
RANK (torchrun and masep's own spawn both set it). Ranks that a masep front end starts inherit
its level through the environment (LEVEL_ENV) and set themselves up the same way on import.
Results and tables stay on stdout, so `--json` output is one document and nothing else.

Progress bars (tqdm) also go to stderr, and only from the front end or rank 0 (`is_leader`), only
on a terminal, and only once a job has run for `delay` seconds: short jobs and redirected output
stay clean. Log lines written while a bar is shown go above it (tqdm.write), not through it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "info"
LEVEL_ENV = "MASEP_LOG_LEVEL"  # front end -> the rank processes it starts
FORMAT = "%(asctime)s [%(who)s] %(levelname)s %(message)s"

log = logging.getLogger("masep")


def add_log_arg(p: argparse.ArgumentParser) -> None:
    """--log-level on a (sub)command's parser; a no-op where the parser has it already."""
    if "--log-level" in p._option_string_actions:
        return
    p.add_argument("--log-level", choices=LEVELS, default=DEFAULT_LEVEL,
                   help="stderr log lines at this level and above, each tagged [front] or [rank N]")


def _world_rank() -> int | None:
    """This process's rank: the joined world's, else RANK's; None in a front end of spawned ranks."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to log
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


def who() -> str:
    rank = _world_rank()
    return "front" if rank is None else f"rank {rank}"


def is_leader() -> bool:
    """The process that shows progress: a front end, or rank 0 of a launch."""
    return _world_rank() in (None, 0)


class _Who(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.who = who()  # per line: a spawned rank learns its RANK after it imported masep
        return True


class _Handler(logging.StreamHandler):
    """stderr, written above any progress bar on the screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: str = DEFAULT_LEVEL) -> logging.Logger:
    """Configure the `masep` loggers of this process (again: the last call wins) and pass the
    level on to rank processes started from here."""
    level = level.lower()
    if level not in LEVELS:
        raise ValueError(f"--log-level {level}: must be one of {', '.join(LEVELS)}")
    os.environ[LEVEL_ENV] = level
    for old in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(old)
    handler = _Handler()
    handler.addFilter(_Who())
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False  # a library user's root handlers would print every line twice
    return log


def setup_from_environment() -> None:
    """In a process started by a masep front end (LEVEL_ENV set): log as the front end does."""
    level = os.environ.get(LEVEL_ENV)
    if level in LEVELS and not any(isinstance(h, _Handler) for h in log.handlers):
        setup_logging(level)


def progress(total: float | None = None, desc: str | None = None, unit: str = "it", *, delay: float = 1.0,
             enabled: bool = True, **kwargs):
    """A tqdm bar on stderr, shown only by the leader on a terminal and after `delay` seconds; a
    disabled bar elsewhere (every method still works, it prints nothing)."""
    from tqdm import tqdm
    show = enabled and is_leader() and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, delay=delay, dynamic_ncols=True,
                leave=False, file=sys.stderr, **kwargs)
