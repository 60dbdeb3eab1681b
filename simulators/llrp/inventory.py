"""What an inventory reads: one activation of a ROSpec stepped round by round over the tag
population (RF model in ``tags``), Gen2 session flags, AISpec stop triggers, and the
TagReportData it accumulates and reports (sans-IO: the driver owns time and tasks)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from simulators.llrp.access import read_ops
from simulators.llrp.codec import (
    Bits,
    EventType,
    ROReportTrigger,
    ROSpecState,
    StopTriggerType,
    TagObservationType,
)
from simulators.llrp.personality import Personality
from simulators.llrp.rospec import AISpec, ROSpec
from simulators.llrp.tags import Observation, TagPopulation

logger = logging.getLogger(__name__)

_IMPINJ_DUAL_TARGET = 2

# (epc, antenna, channel, spec index, parameter spec id): None where the selector merges them;
# then the answering tag's TID when an AccessSpec read its memory (a clone sharing the EPC is
# another tag: its own TagReportData with its own results), else None.
EntryKey = tuple[str, int | None, int | None, int | None, int | None, str | None]


@dataclass
class Entry:
    """Aggregated TagReportData for one tag (and antenna/channel/… as the selector separates)."""

    epc: str
    antenna: int
    channel: int
    peak: int
    first_utc: int
    last_utc: int
    count: int
    spec_index: int
    ips_id: int
    # C1G2Read results of the AccessSpecs run on the tag: (OpSpecID, Result, words).
    reads: tuple[tuple[int, int, list[int]], ...] = ()


class InventoryHost(Protocol):
    """What an inventory run needs of the reader it runs on."""

    accum: dict[int, dict[EntryKey, Entry]]  # ROSpec id -> what is not reported yet
    access_specs: dict[int, dict[str, Any]]  # AccessSpec id -> the spec as added

    @property
    def tags(self) -> TagPopulation: ...

    @property
    def rng(self) -> random.Random: ...

    @property
    def personality(self) -> Personality: ...

    @property
    def antenna_connected(self) -> Mapping[int, bool]: ...

    @property
    def sensitivity_dbm(self) -> float: ...

    @property
    def model_sessions(self) -> bool: ...

    @property
    def s1_persistence_s(self) -> float: ...

    def report_spec(self, rs: ROSpec) -> Mapping[str, Any]: ...

    def event_enabled(self, kind: EventType) -> bool: ...

    def event(self, data: dict[str, Any]) -> None: ...

    def deliver(self, name: str, params: dict[str, Any]) -> None: ...

    def cycle_done(self) -> None: ...

    def notify(self) -> None: ...

    def utc_us(self) -> int: ...


class InventoryRun:
    """One activation of a ROSpec. Its driver calls ``start``, then, while not ``over``, for
    each AISpec ``begin_aispec``, ``round`` (one every cycle) while ``aispec_running``,
    ``end_aispec``; and ``finish`` at the end. ``stop`` ends it from outside at once, doing
    what the remaining steps would have done (the last AISpec's and the ROSpec's reports and
    events)."""

    def __init__(self, host: InventoryHost, rs: ROSpec) -> None:
        self.host = host
        self.rs = rs
        self.started = False
        self.finished = False
        self._deadline: float | None = None
        self._gpi_timeout: float | None = None
        self._flags: dict[tuple[str, int], float] = {}  # Gen2 inventoried flags: (epc, session)
        self._ai: AISpec | None = None  # between begin_aispec and end_aispec
        self._ai_started = 0.0
        self._obs_total = 0
        self._unique: set[str] = set()
        self._last_new = 0.0
        self._cycles = 0

    # -- the ROSpec ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        rs = self.rs
        if rs.stop_type == StopTriggerType.Duration:
            self._deadline = now + rs.stop_duration_ms / 1000
        if rs.stop_gpi is not None and rs.stop_gpi[2]:
            self._gpi_timeout = now + rs.stop_gpi[2] / 1000
        self._announce()

    def over(self, now: float) -> bool:
        return (
            self.finished
            or self.rs.gpi_stop
            or (self._deadline is not None and now >= self._deadline)
            or (self._gpi_timeout is not None and now >= self._gpi_timeout)
        )

    def finish(self) -> None:
        """The end of the ROSpec: what is left is reported, it is Inactive, an event says so."""
        if self.finished:
            return
        self.finished = True
        rs, host = self.rs, self.host
        if host.report_spec(rs)["ROReportTrigger"] != ROReportTrigger.None_:
            self._flush()
        if rs.state == ROSpecState.Active:
            rs.state = ROSpecState.Inactive
        if host.event_enabled(EventType.ROSpec_Event):
            host.event(
                {"ROSpecEvent": {"EventType": 1, "ROSpecID": rs.spec_id, "PreemptingROSpecID": 0}}
            )
        logger.info("llrp-sim: ROSpec %d ended", rs.spec_id)
        host.notify()

    def stop(self) -> None:
        """Told to stop (STOP/DISABLE/DELETE_ROSPEC, a reset, a reboot): end it now."""
        if self.finished:
            return
        if not self.started:
            self._announce()
        if self._ai is not None:
            self.end_aispec()
        self.finish()

    def _announce(self) -> None:
        self.started = True
        if self.host.event_enabled(EventType.ROSpec_Event):
            self.host.event(
                {
                    "ROSpecEvent": {
                        "EventType": 0,
                        "ROSpecID": self.rs.spec_id,
                        "PreemptingROSpecID": 0,
                    }
                }
            )
        logger.info("llrp-sim: ROSpec %d started", self.rs.spec_id)

    # -- one AISpec ----------------------------------------------------------------------------

    def begin_aispec(self, ai: AISpec, now: float) -> None:
        self._ai = ai
        self._ai_started = now
        self._obs_total = 0
        self._unique = set()
        self._last_new = now
        self._cycles = 0
        self.rs.current_ai = ai
        self.rs.ai_gpi_stop = False

    def aispec_running(self, now: float) -> bool:
        return not self.over(now) and not self.rs.ai_gpi_stop

    def round(self, now: float) -> bool:
        """One inventory round on the AISpec's connected antennas; True when its stop trigger
        fired (the round still takes its cycle)."""
        ai, host = self._ai, self.host
        assert ai is not None, "round() outside an AISpec"
        seen = host.tags.cycle(
            host.rng,
            [a for a in ai.antennas if host.antenna_connected[a]],
            channels=host.personality.hop_channels,
            utc_us=host.utc_us(),
            power_offset=ai.power_offset,
            floor_dbm=host.sensitivity_dbm,
        )
        seen = [o for o in seen if self._answers(ai, o, now)]
        host.cycle_done()
        self._cycles += 1
        self._obs_total += len(seen)
        for o in seen:
            if o.epc not in self._unique:
                self._unique.add(o.epc)
                self._last_new = now
        self._accumulate(ai, seen)
        elapsed_ms = (now - self._ai_started) * 1000
        return (
            (ai.stop_type == StopTriggerType.Duration and elapsed_ms >= ai.duration_ms)
            or (ai.gpi is not None and ai.gpi[2] > 0 and elapsed_ms >= ai.gpi[2])
            or (
                ai.observation is not None
                and observation_done(
                    ai.observation,
                    self._obs_total,
                    len(self._unique),
                    self._cycles,
                    elapsed_ms,
                    (now - self._last_new) * 1000,
                )
            )
        )

    def end_aispec(self) -> None:
        ai, rs, host = self._ai, self.rs, self.host
        assert ai is not None, "end_aispec() outside an AISpec"
        self._ai = None
        if host.report_spec(rs)["ROReportTrigger"] == ROReportTrigger.Upon_N_Tags_Or_End_Of_AISpec:
            self._flush()
        if host.event_enabled(EventType.AISpec_Event):
            host.event(
                {"AISpecEvent": {"EventType": 0, "ROSpecID": rs.spec_id, "SpecIndex": ai.index}}
            )

    # -- reads and reports ---------------------------------------------------------------------

    def _answers(self, ai: AISpec, o: Observation, now: float) -> bool:
        """Gen2 inventoried flags: in S1 a tag rests for a while, in S2/S3 until the ROSpec restarts,
        unless the reader flips the target each round (Impinj dual target) or S0 is used."""
        if not self.host.model_sessions:
            return True
        session, mode, aware = ai.sessions.get(o.antenna, (1, None, False))
        if session == 0 or mode == _IMPINJ_DUAL_TARGET or aware:
            return True
        key = (o.epc, session)
        last = self._flags.get(key)
        if last is not None and (session >= 2 or now - last < self.host.s1_persistence_s):
            return False
        self._flags[key] = now
        return True

    def _accumulate(self, ai: AISpec, seen: list[Observation]) -> None:
        rs = self.rs
        spec = self.host.report_spec(rs)
        sel = spec.get("TagReportContentSelector", {})
        acc = self.host.accum.setdefault(rs.spec_id, {})
        specs = self.host.access_specs
        for o in seen:
            ops = read_ops(specs, rs.spec_id, o.antenna, o.tag) if specs and o.tag else []
            key: EntryKey = (
                o.epc,
                o.antenna if sel.get("EnableAntennaID") else None,
                o.channel if sel.get("EnableChannelIndex") else None,
                ai.index if sel.get("EnableSpecIndex") else None,
                ai.ips_id if sel.get("EnableInventoryParameterSpecID") else None,
                o.tag.tid_bytes.hex() if ops and o.tag else None,
            )
            e = acc.get(key)
            if e is None:
                acc[key] = Entry(
                    o.epc,
                    o.antenna,
                    o.channel,
                    o.rssi,
                    o.utc_us,
                    o.utc_us,
                    1,
                    ai.index,
                    ai.ips_id,
                    tuple((op.op_spec_id, *op.run(o.tag)) for op in ops if o.tag is not None),
                )
            else:
                e.count += 1
                e.last_utc = o.utc_us
                if o.rssi > e.peak:
                    e.peak = o.rssi
        n = spec["N"]
        trigger = spec["ROReportTrigger"]
        if trigger != ROReportTrigger.None_ and n > 0:
            while len(acc) >= n:
                keys = list(acc)[:n]
                self._send_report([acc.pop(k) for k in keys])

    def _flush(self) -> None:
        acc = self.host.accum.pop(self.rs.spec_id, None)
        if acc:
            self._send_report(list(acc.values()))

    def _send_report(self, entries: list[Entry]) -> None:
        if not entries:
            return
        host = self.host
        spec = host.report_spec(self.rs)
        data = [tag_report(self.rs, spec, e, host.personality, host.rng) for e in entries]
        host.deliver("RO_ACCESS_REPORT", {"TagReportData": data})


def observation_done(
    obs: Mapping[str, Any],
    total: int,
    unique: int,
    cycles: int,
    elapsed_ms: float,
    quiet_ms: float,
) -> bool:
    """Whether a TagObservationTrigger ends its AISpec."""
    timeout: int = obs["Timeout"]
    if timeout and elapsed_ms >= timeout:
        return True
    kind: int = obs["TriggerType"]
    n: int = obs["NumberOfTags"]
    attempts: int = obs["NumberOfAttempts"]
    quiet_limit: int = obs["T"]
    if kind == TagObservationType.Upon_Seeing_N_Tags_Or_Timeout:
        return n > 0 and total >= n
    if kind == TagObservationType.Upon_Seeing_N_Unique_Tags_Or_Timeout:
        return n > 0 and unique >= n
    if kind in (
        TagObservationType.Upon_Seeing_No_More_New_Tags_For_Tms_Or_Timeout,
        TagObservationType.Upon_Seeing_No_More_New_Unique_Tags_For_Tms_Or_Timeout,
    ):
        return quiet_ms >= quiet_limit
    return attempts > 0 and cycles >= attempts


def tag_report(
    rs: ROSpec, spec: Mapping[str, Any], e: Entry, personality: Personality, rng: random.Random
) -> dict[str, Any]:
    """One TagReportData, with what the report spec's selectors ask for."""
    sel = spec.get("TagReportContentSelector", {})
    epc = bytes.fromhex(e.epc)
    out: dict[str, Any] = {}
    if len(epc) == 12:
        out["EPC_96"] = epc
    else:
        out["EPCData"] = {"EPC": Bits(len(epc) * 8, epc)}
    if sel.get("EnableROSpecID"):
        out["ROSpecID"] = rs.spec_id
    if sel.get("EnableSpecIndex"):
        out["SpecIndex"] = e.spec_index
    if sel.get("EnableInventoryParameterSpecID"):
        out["InventoryParameterSpecID"] = e.ips_id
    if sel.get("EnableAntennaID"):
        out["AntennaID"] = e.antenna
    if sel.get("EnablePeakRSSI"):
        out["PeakRSSI"] = e.peak
    if sel.get("EnableChannelIndex"):
        out["ChannelIndex"] = e.channel
    if sel.get("EnableFirstSeenTimestamp"):
        out["FirstSeenTimestampUTC"] = e.first_utc
    if sel.get("EnableLastSeenTimestamp"):
        out["LastSeenTimestampUTC"] = e.last_utc
    if sel.get("EnableTagSeenCount"):
        out["TagSeenCount"] = min(e.count, 0xFFFF)
    mem = (sel.get("C1G2EPCMemorySelector") or [{}])[0]
    pc = (len(epc) // 2) << 11
    if mem.get("EnablePCBits"):
        out["C1G2_PC"] = pc
    if mem.get("EnableCRC"):
        out["C1G2_CRC"] = gen2_crc16(pc.to_bytes(2, "big") + epc)
    if sel.get("EnableAccessSpecID"):
        out["AccessSpecID"] = 0
    if e.reads:
        out["C1G2ReadOpSpecResult"] = [
            {"Result": result, "OpSpecID": op_spec_id, "ReadData": words}
            for op_spec_id, result, words in e.reads
        ]
    impinj = spec.get("ImpinjTagReportContentSelector")
    if impinj and personality.impinj_extensions:
        if (impinj.get("ImpinjEnablePeakRSSI") or {}).get("PeakRSSIMode") == 1:
            out["ImpinjPeakRSSI"] = {"RSSI": e.peak * 100}
        if (impinj.get("ImpinjEnableRFPhaseAngle") or {}).get("RFPhaseAngleMode") == 1:
            out["ImpinjRFPhaseAngle"] = {"PhaseAngle": rng.randrange(4096)}
        if (impinj.get("ImpinjEnableRFDopplerFrequency") or {}).get("RFDopplerFrequencyMode") == 1:
            out["ImpinjRFDopplerFrequency"] = {"DopplerFrequency": rng.randint(-50, 50)}
    return out


def gen2_crc16(data: bytes) -> int:
    """CRC-16 as a Gen2 tag computes it over PC+EPC (poly 0x1021, preset 0xFFFF, inverted)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc ^ 0xFFFF
