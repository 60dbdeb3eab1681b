"""The TID a reader read from a tag's TID memory bank, checked before it reaches a ``TagRead``.

A TID is what a cloner cannot copy: the chip maker writes (and locks) it, so two tags with the
same EPC and different TIDs are two tags. Readers read it as part of an inventory (LLRP: an
AccessSpec with a C1G2Read of memory bank 2; Mercury: an embedded read in the read command).
Whatever comes back is untrusted: a result of the wrong size is *refused* with a reason and the
read is kept as a plain read (``tid=None``), never dropped and never given a half TID.
"""

from __future__ import annotations

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


__all__ = [
    "DEFAULT_TID_WORDS",
    "MAX_TID_WORDS",
    "MIN_TID_WORDS",
    "TID_BANK",
    "TidRefused",
    "tid_hex",
]
