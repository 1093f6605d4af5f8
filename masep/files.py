"""Reading the JSON files users hand us (configs, profiles, calibrations, measurements)."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str):
    """Parsed JSON of `path`; a ValueError naming `what` (the flag or file kind) and the path
    when the file is missing or is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
