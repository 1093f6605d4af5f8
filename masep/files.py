"""Reading the JSON and TOML files users hand us (configs, profiles, calibrations, measurements,
plan files), and writing the TOML ones (stdlib tomllib reads TOML but does not write it)."""
from __future__ import annotations

import json
import math
import re
import tomllib
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


def read_toml(path: str | Path, what: str) -> dict:
    """Parsed TOML of `path`; a ValueError naming `what` (the flag) and the path when the file is
    missing or is not valid TOML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: not valid TOML ({err})") from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _is_table_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def toml_text(doc: dict, comment: str = "") -> str:
    """TOML of a document of scalars, lists of scalars, tables (dicts of those) and lists of
    tables; `comment` lines go on top. None values are left out (TOML has no null)."""
    def pairs(table: dict) -> list[str]:
        out = []
        for k, v in table.items():
            if v is None or isinstance(v, dict) or _is_table_list(v):
                continue
            text = _toml_value(v)
            if isinstance(v, (list, tuple)) and len(text) > 100:  # one item a line
                text = "[\n" + "".join(f"    {_toml_value(x)},\n" for x in v) + "]"
            out.append(f"{_toml_key(k)} = {text}")
        return out

    lines = [f"# {line}".rstrip() for line in comment.splitlines()] + pairs(doc)
    for key, value in doc.items():
        if isinstance(value, dict):
            lines += ["", f"[{_toml_key(key)}]", *pairs(value)]
        elif _is_table_list(value):
            for table in value:
                lines += ["", f"[[{_toml_key(key)}]]", *pairs(table)]
    return "\n".join(lines) + "\n"
