"""The backend's side of the audit anchors (docs/privacy.md §9): each new ``audit.anchor`` of a
cabinet must extend the chain its previous anchor showed. A rewritten or truncated chain is
reported, never silently adopted as the new normal without a report."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_RECENT = 100


Head = tuple[int, str]  # (seq, hash hex) of the last record an anchor showed


def judge(prev: Head | None, anchor: Mapping[str, Any]) -> tuple[Head, list[str]]:
    """This anchor's head, and its problems against the cabinet's previous head (``prev``,
    None: the first anchor seen): empty if it extends it. The caller moves the cabinet's head
    to the anchor's either way, so the next one is judged against what this one shows."""
    links = [(int(x["seq"]), str(x["prev_hash"]), str(x["hash"])) for x in anchor["links"]]
    head = (int(anchor["head_seq"]), str(anchor["head_hash"]))
    found: list[str] = []
    for (s0, _p0, h0), (s1, p1, _h1) in itertools.pairwise(links):
        if s1 != s0 + 1 or p1 != h0:
            found.append(f"anchor links break between records {s0} and {s1}")
            break
    if links and (links[-1][0], links[-1][2]) != head:
        found.append("anchor head is not its last link")
    if prev is not None and not found:
        prev_seq, prev_hash = prev
        by_seq = {s: h for s, _p, h in links}
        if head[0] < prev_seq:
            found.append(
                f"audit chain truncated: head went back from record {prev_seq} to {head[0]}"
            )
        elif prev_seq in by_seq:
            if by_seq[prev_seq] != prev_hash:
                found.append(
                    f"audit chain rewritten: record {prev_seq} no longer has the hash "
                    "the previous anchor showed"
                )
        elif links and links[0][0] > prev_seq:
            found.append(
                f"audit anchors missing: records {prev_seq + 1}..{links[0][0] - 1} "
                "were never anchored"
            )
    return head, found


@dataclass
class AnchorBook:
    """The last anchored head of each cabinet's chain (``site/cabinet``), in memory: the
    printing consumer's. The recording consumer keeps it in the record (``audit_anchor_head``,
    backend/record/recorder.py), so it survives a restart."""

    heads: dict[str, Head] = field(default_factory=dict)
    problems: int = 0
    recent: list[str] = field(default_factory=list)  # the last MAX_RECENT problems reported

    def check(self, cabinet: str, anchor: Mapping[str, Any]) -> list[str]:
        """Problems with this anchor (empty: it extends the previous one)."""
        head, found = judge(self.heads.get(cabinet), anchor)
        self.heads[cabinet] = head
        self.problems += bool(found)
        self.recent = [*self.recent, *found][-MAX_RECENT:]
        return found
