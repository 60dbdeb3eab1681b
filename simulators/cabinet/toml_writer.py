"""A TOML writer for the agent config shapes the scenario rig generates."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any


def to_toml(doc: Mapping[str, Any]) -> str:
    """TOML for the config shapes used here: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    _emit_table(lines, (), doc)
    return "\n".join(lines).strip() + "\n"


def _emit_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    subtables: list[tuple[str, Any]] = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping) or (
            isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)
        ):
            subtables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        sub = (*path, key)
        header = ".".join(_key(k) for k in sub)
        if isinstance(value, Mapping):
            lines += ["", f"[{header}]"]
            _emit_table(lines, sub, value)
        else:
            for element in value:
                lines += ["", f"[[{header}]]"]
                _emit_table(lines, sub, element)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("TOML numbers here must be finite")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
