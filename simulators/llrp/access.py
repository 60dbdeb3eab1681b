"""AccessSpecs at work: the memory reads a reader does on each tag its inventory singulates.

Only ``C1G2Read`` is executed (the TID and EPC banks; other banks overrun: the simulated tags
have no user memory, and the reserved bank is locked), for AccessSpecs that are enabled, for the
Gen2 protocol, whose antenna (0: any) and ROSpec (0: any) match, and whose ``C1G2TargetTag``
matches: an empty mask matches every tag; a mask on the EPC bank (MB 1, bit pointer into
CRC + PC + EPC) is compared bit by bit; masks on other banks match nothing. Results ride with
the tag's TagReportData as ``C1G2ReadOpSpecResult``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulators.llrp.tags import SimTag

READ_SUCCESS = 0
READ_MEMORY_OVERRUN = 4
READ_MEMORY_LOCKED = 5
_BANK_EPC = 1
_BANK_TID = 2


@dataclass(frozen=True)
class ReadOp:
    """One C1G2Read of an enabled AccessSpec."""

    access_spec_id: int
    op_spec_id: int
    bank: int
    word_pointer: int
    word_count: int  # 0: to the end of the bank

    def run(self, tag: SimTag) -> tuple[int, list[int]]:
        """(Result, words read) on ``tag``."""
        if self.bank == _BANK_TID:
            memory = tag.tid_bytes
        elif self.bank == _BANK_EPC:
            memory = _epc_bank(tag)
        elif self.bank == 0:
            return READ_MEMORY_LOCKED, []
        else:
            return READ_MEMORY_OVERRUN, []
        words = [int.from_bytes(memory[i : i + 2], "big") for i in range(0, len(memory), 2)]
        end = len(words) if self.word_count == 0 else self.word_pointer + self.word_count
        if self.word_pointer >= len(words) or end > len(words):
            return READ_MEMORY_OVERRUN, []
        return READ_SUCCESS, words[self.word_pointer : end]


def read_ops(
    access_specs: Mapping[int, Mapping[str, Any]], rospec_id: int, antenna: int, tag: SimTag
) -> list[ReadOp]:
    """The reads the reader does on ``tag`` singulated by ``antenna`` under ROSpec ``rospec_id``."""
    ops: list[ReadOp] = []
    for sid, spec in sorted(access_specs.items()):
        if not spec.get("CurrentState") or spec.get("ProtocolID") != 1:
            continue
        if spec.get("AntennaID") not in (0, antenna) or spec.get("ROSpecID") not in (0, rospec_id):
            continue
        cmd = spec.get("AccessCommand") or {}
        targets = (cmd.get("C1G2TagSpec") or {}).get("C1G2TargetTag") or []
        if not targets or not all(_matches(t, tag) for t in targets[:2]):
            continue
        for read in cmd.get("C1G2Read") or []:
            ops.append(
                ReadOp(sid, read["OpSpecID"], read["MB"], read["WordPointer"], read["WordCount"])
            )
    return ops


def _matches(target: Mapping[str, Any], tag: SimTag) -> bool:
    mask, data = target.get("TagMask"), target.get("TagData")
    bits = getattr(mask, "count", 0)
    if bits == 0:
        return bool(target.get("Match"))
    if target.get("MB") != _BANK_EPC:
        return False
    memory = int.from_bytes(b"\0\0" + _epc_bank(tag), "big")  # CRC (0 here), PC, EPC
    width = (len(_epc_bank(tag)) + 2) * 8
    pointer = int(target.get("Pointer", 0))
    if pointer + bits > width:
        return not target.get("Match")
    window = (memory >> (width - pointer - bits)) & ((1 << bits) - 1)
    want = int.from_bytes(getattr(mask, "data", b""), "big") >> (-bits % 8)
    value = int.from_bytes(getattr(data, "data", b""), "big") >> (-bits % 8)
    hit = (window & want) == (value & want)
    return hit == bool(target.get("Match"))


def _epc_bank(tag: SimTag) -> bytes:
    epc = tag.epc_bytes
    return ((len(epc) // 2) << 11).to_bytes(2, "big") + epc
