"""Scan files for raw badge ids in every encoding a careless write could leave behind."""

from __future__ import annotations

import base64
import re
import string
from collections.abc import Iterable, Iterator
from pathlib import Path

_HEX = frozenset(string.hexdigits)


def id_variants(raw_id: str) -> dict[str, bytes]:
    """Byte patterns that would reveal ``raw_id``: text in several cases and encodings, hex, binary."""
    variants: dict[str, bytes] = {}
    for case_name, text in (
        ("as-is", raw_id),
        ("lower", raw_id.lower()),
        ("upper", raw_id.upper()),
    ):
        variants[f"utf-8 {case_name}"] = text.encode("utf-8")
        variants[f"utf-16-le {case_name}"] = text.encode("utf-16-le")
        variants[f"utf-16-be {case_name}"] = text.encode("utf-16-be")
        variants[f"hex of utf-8 {case_name}"] = text.encode("utf-8").hex().encode()
        # Only whole 4-character groups: the last partial group depends on what follows.
        b64 = base64.b64encode(text.encode("utf-8"))
        if len(text) >= 6:
            variants[f"base64 of utf-8 {case_name}"] = b64[: (len(text) // 3) * 4]
    compact = raw_id.replace(":", "").replace("-", "").replace(" ", "")
    # An id that is itself hex (EM4100 cards print as 10 hex digits) may be stored as bytes.
    if len(compact) >= 8 and len(compact) % 2 == 0 and set(compact) <= _HEX:
        variants["binary of hex id"] = bytes.fromhex(compact)
    if compact.isdigit() and len(compact) >= 6:
        number = int(compact)
        for width in (4, 5, 8):
            if number < 1 << (8 * width):
                variants[f"big-endian u{8 * width}"] = number.to_bytes(width, "big")
                variants[f"little-endian u{8 * width}"] = number.to_bytes(width, "little")
    return variants


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            yield path


def find_raw_ids(paths: Iterable[Path], raw_ids: Iterable[str]) -> list[str]:
    """Every hit as 'file @offset: id #n as <variant>' (the id itself is never printed)."""
    ids = list(raw_ids)
    hits: list[str] = []
    patterns = [
        (n, name, pat) for n, rid in enumerate(ids) for name, pat in id_variants(rid).items()
    ]
    for file in _files(paths):
        data = file.read_bytes()
        for n, name, pat in patterns:
            match = re.search(re.escape(pat), data)
            if match is not None:
                hits.append(f"{file} @{match.start()}: raw id #{n} as {name}")
    return hits


def assert_no_raw_ids(paths: Iterable[Path], raw_ids: Iterable[str]) -> None:
    """Fail if any raw id appears in any file (directories are scanned recursively)."""
    paths = list(paths)
    scanned = list(_files(paths))
    assert scanned, f"nothing to scan in {paths}: the check would prove nothing"
    hits = find_raw_ids(scanned, raw_ids)
    assert not hits, "raw badge ids found on disk:\n" + "\n".join(hits)
