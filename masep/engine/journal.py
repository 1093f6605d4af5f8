"""A run's journal: each finished request on disk as soon as it finishes, so a job that is
restarted (torchrun --max-restarts, after a rank failed and its agent stopped every worker)
runs only the requests that were not finished, and none is lost or run twice.

The file is JSON lines: a header naming the requests it belongs to (a hash of every prompt and
its sampling settings), then one line per finished request. A journal written for other
requests is refused, naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

VERSION = 1


def fingerprint(requests) -> str:
    """The requests' identity: prompts and sampling settings, in order."""
    h = hashlib.sha256()
    for r in requests:
        fields = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(vars(r))
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class Journal:
    def __init__(self, path: str | Path, requests):
        self.path = Path(path)
        self.fingerprint = fingerprint(requests)
        self.size = len(requests)

    def load(self) -> dict[int, dict]:
        """{request index: its entry} of the requests a previous attempt finished; creates the
        file (with its header) when there is none."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append({"journal": VERSION, "fingerprint": self.fingerprint, "requests": self.size})
            return {}
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
        except (IndexError, json.JSONDecodeError) as err:
            raise ValueError(f"--journal {self.path}: not a masep journal (first line: {err})") from err
        if header.get("fingerprint") != self.fingerprint:
            raise ValueError(f"--journal {self.path}: written for other requests (fingerprint "
                             f"{header.get('fingerprint')}, these are {self.fingerprint}); delete it or give "
                             "another path")
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of an attempt killed mid-write
                continue
            done[int(entry["index"])] = entry
        return done

    def record(self, index: int, tokens: list[int], finish_reason: str | None, error: str | None) -> None:
        self._append({"index": index, "tokens": tokens, "finish_reason": finish_reason, "error": error})

    def _append(self, entry: dict) -> None:
        with self.path.open("a") as f:  # flushed and synced: the next attempt may start after a crash
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
