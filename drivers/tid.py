"""The TID a reader read from a tag's TID memory bank, checked before it reaches a ``TagRead``.

A TID is what a cloner cannot copy: the chip maker writes (and locks) it, so two tags with the
same EPC and different TIDs are two tags. Readers read it as part of an inventory (LLRP: an
AccessSpec with a C1G2Read of memory bank 2; Mercury: an embedded read in the read command).
Whatever comes back is untrusted: a result of the wrong size is *refused* with a reason and the
read is kept as a plain read (``tid=None``), never dropped and never given a half TID.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TID_BANK = 2
MIN_TID_WORDS = 2  # class identifier + mask designer + model: less identifies no chip
MAX_TID_WORDS = 32  # 512 bits: every serialised (XTID) layout fits
DEFAULT_TID_WORDS = 6  # 96 bits: class id, maker, model and a 48-bit serial (Impinj, NXP)


class TidRefused(ValueError):
    """A TID read result that cannot be used; the message is the reason (no tag data)."""


def tid_hex(data: bytes, words: int) -> str:
    """The TID ``data`` as lower-case hex, when it is exactly the ``words`` asked for."""
    if len(data) % 2:
        raise TidRefused(f"TID of {len(data)} bytes is not whole 16-bit words")
    got = len(data) // 2
    if got > words:
        raise TidRefused(f"TID of {got} words is longer than the {words} asked for")
    if got < words:
        raise TidRefused(f"TID of {got} words is shorter than the {words} asked for")
    return data.hex()


@dataclass
class TidTally:
    """What became of a reader's TID results, for its stats and its log.

    ``read``: TIDs handed on. ``failed``: the reader could not read the tag's TID this time (a
    weak tag, one that left mid-access) — no TID, nobody's fault. ``refused``: the result was
    unusable (malformed, wrong size, …) — the read is kept plain; ``last_refusal`` says why
    (sizes and numbers only, never tag data)."""

    words: int
    read: int = 0
    failed: int = 0
    refused: int = 0
    last_refusal: str = ""
    _logged: int = field(default=0, repr=False)

    def accept(self, data: bytes) -> str | None:
        """The TID in ``data`` (exactly ``words`` words), or None after refusing it."""
        try:
            tid = tid_hex(data, self.words)
        except TidRefused as err:
            self.refuse(str(err))
            return None
        self.read += 1
        return tid

    def fail(self) -> None:
        self.failed += 1

    def refuse(self, reason: str) -> None:
        self.refused += 1
        self.last_refusal = reason[:200]

    def refusal_to_log(self) -> str | None:
        """The reason to log, at the 1st, 10th, 100th… refusal (a reader sending nothing but
        bad results cannot flood the journal), else None."""
        before = self._logged
        if self.refused == before:
            return None
        self._logged = self.refused
        if before == 0 or len(str(self.refused)) > len(str(before)):
            return self.last_refusal
        return None


__all__ = [
    "DEFAULT_TID_WORDS",
    "MAX_TID_WORDS",
    "MIN_TID_WORDS",
    "TID_BANK",
    "TidRefused",
    "TidTally",
    "tid_hex",
]
