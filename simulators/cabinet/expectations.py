"""Comparing the agent's decrypted events with a scenario's expected list, by names."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any

from simulators.cabinet.provisioning import AgentArtefacts
from simulators.cabinet.scenario import Expected

# Fields that differ on every run: never part of a description unless a scenario names them.
_VOLATILE = frozenset(
    {"event_id", "seq", "time", "site_id", "cabinet_id", "schema_version", "session_id", "until"}
)


def describe_event(event: Mapping[str, Any], artefacts: AgentArtefacts) -> dict[str, Any]:
    """An event with names instead of pseudonyms and EPCs (``item``), volatile fields dropped."""
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in _VOLATILE:
            continue
        if key in ("actors", "held_by", "returned_by") and isinstance(value, list):
            out[key] = [artefacts.name_of(a) for a in value]
        elif key in ("actor", "technician") and isinstance(value, str):
            # A technician is a pseudonym (a supervisor's badge) or the local account that ran
            # cabinetctl: this process's own uid reads "uid:self", whoever runs the tests.
            out[key] = "uid:self" if value == f"uid:{os.getuid()}" else artefacts.name_of(value)
        elif key == "epc" and isinstance(value, str):
            out["epc"] = value
            if value in artefacts.items:
                out["item"] = artefacts.items[value]
        elif key == "items" and isinstance(value, dict):
            out[key] = {artefacts.items.get(e, e): d for e, d in value.items()}
        else:
            out[key] = value
    return out


def match_events(
    expected: Sequence[Expected],
    actual: Sequence[Mapping[str, Any]],
    artefacts: AgentArtefacts,
) -> list[str]:
    """Problems (empty: exact match) comparing the expected list with the events in seq order."""
    problems: list[str] = []
    described = [describe_event(e, artefacts) for e in actual]
    for i in range(max(len(expected), len(described))):
        exp = expected[i].fields() if i < len(expected) else None
        got = described[i] if i < len(described) else None
        if exp is None:
            problems.append(f"#{i + 1}: unexpected {_short(got)}")
            continue
        if got is None:
            problems.append(f"#{i + 1}: missing {_short(exp)}")
            continue
        for key, want in exp.items():
            have = got.get(key, "<absent>")
            if _normal(have) != _normal(want):
                problems.append(f"#{i + 1} {got.get('type')}: {key} = {have!r}, expected {want!r}")
    return problems


def _normal(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _short(event: Mapping[str, Any] | None) -> str:
    return json.dumps(event, default=str, sort_keys=True)


def describe_events(events: Iterable[Mapping[str, Any]], artefacts: AgentArtefacts) -> str:
    """One line per event (for failure messages and the CLI)."""
    return "\n".join(_short(describe_event(e, artefacts)) for e in events)
