"""ROSpecs and AISpecs as the reader holds them: parsed from ADD_ROSPEC and checked against what
the reader can do, or refused with the LLRPStatus a reader answers (sans-IO: no sockets, no
asyncio)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from simulators.llrp.codec import (
    ROReportTrigger,
    ROSpecState,
    StartTriggerType,
    StatusCode,
    StopTriggerType,
    TagObservationType,
)
from simulators.llrp.personality import Personality

if TYPE_CHECKING:
    from simulators.llrp.inventory import InventoryRun


def status(code: int = StatusCode.M_Success, description: str = "") -> dict[str, Any]:
    """An LLRPStatus parameter."""
    return {"StatusCode": int(code), "ErrorDescription": description}


class Rejected(Exception):
    """A request the reader refuses; becomes the response's LLRPStatus."""

    def __init__(self, code: StatusCode, description: str) -> None:
        super().__init__(description)
        self.code = code


class RunHandle(Protocol):
    """What the reader model keeps of the task that drives a ROSpec's inventory."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


class SpecContext(Protocol):
    """What parsing needs to know of the reader."""

    @property
    def antennas(self) -> int: ...

    @property
    def personality(self) -> Personality: ...

    def antenna_config(self, ant: int) -> dict[str, Any]: ...


@dataclass
class AISpec:
    index: int
    antennas: list[int]
    stop_type: int
    duration_ms: int
    gpi: tuple[int, bool, int] | None
    observation: dict[str, Any] | None
    ips_id: int
    sessions: dict[int, tuple[int, int | None, bool]]  # antenna -> (session, search mode, aware)
    power_offset: dict[int, float]  # antenna -> dB below the reader's full power


@dataclass
class ROSpec:
    spec_id: int
    raw: dict[str, Any]
    start_type: int
    start_gpi: tuple[int, bool] | None
    stop_type: int
    stop_duration_ms: int
    stop_gpi: tuple[int, bool, int] | None
    aispecs: list[AISpec]
    report_spec: dict[str, Any] | None
    state: ROSpecState = ROSpecState.Disabled
    # The current (or last) activation, and the server's task that drives it.
    run: InventoryRun | None = None
    task: RunHandle | None = None
    gpi_stop: bool = False  # the ROSpec's GPI stop trigger fired
    current_ai: AISpec | None = None
    ai_gpi_stop: bool = False  # the current AISpec's GPI stop trigger fired


def parse_rospec(raw: Mapping[str, Any], reader: SpecContext) -> ROSpec:
    """A ROSpec from ADD_ROSPEC, checked against what this reader can do."""
    spec_id = raw["ROSpecID"]
    if spec_id == 0:
        raise Rejected(StatusCode.M_FieldError, "ROSpecID 0 is reserved")
    if raw["CurrentState"] != ROSpecState.Disabled:
        raise Rejected(StatusCode.M_FieldError, "a new ROSpec must be Disabled")
    if raw["Priority"] > 7:
        raise Rejected(StatusCode.M_FieldError, "Priority must be 0..7")
    boundary = raw.get("ROBoundarySpec")
    if (
        boundary is None
        or "ROSpecStartTrigger" not in boundary
        or "ROSpecStopTrigger" not in boundary
    ):
        raise Rejected(
            StatusCode.M_MissingParameter, "ROSpec needs ROBoundarySpec with both triggers"
        )
    if raw.get("RFSurveySpec"):
        raise Rejected(StatusCode.M_UnsupportedParameter, "RFSurveySpec not supported")
    if not raw.get("AISpec"):
        raise Rejected(StatusCode.M_MissingParameter, "ROSpec needs at least one AISpec")
    start = boundary["ROSpecStartTrigger"]
    start_type = start["ROSpecStartTriggerType"]
    start_gpi = None
    if start_type == StartTriggerType.GPI:
        g = start.get("GPITriggerValue")
        if g is None:
            raise Rejected(StatusCode.M_MissingParameter, "GPI start trigger needs GPITriggerValue")
        start_gpi = (g["GPIPortNum"], g["GPIEvent"])
    elif start_type not in (StartTriggerType.Null, StartTriggerType.Immediate):
        raise Rejected(StatusCode.M_UnsupportedParameter, "periodic start trigger not supported")
    stop = boundary["ROSpecStopTrigger"]
    stop_type = stop["ROSpecStopTriggerType"]
    stop_gpi = None
    if stop_type == StopTriggerType.GPI_With_Timeout:
        g = stop.get("GPITriggerValue")
        if g is None:
            raise Rejected(StatusCode.M_MissingParameter, "GPI stop trigger needs GPITriggerValue")
        stop_gpi = (g["GPIPortNum"], g["GPIEvent"], g["Timeout"])
    elif stop_type not in (StopTriggerType.Null, StopTriggerType.Duration):
        raise Rejected(StatusCode.M_FieldError, f"ROSpecStopTriggerType {stop_type}")
    aispecs = [_parse_aispec(i, ai, reader) for i, ai in enumerate(raw["AISpec"], start=1)]
    report = raw.get("ROReportSpec")
    if report is not None:
        validate_report_spec(report)
    return ROSpec(
        spec_id=spec_id,
        raw=dict(raw),
        start_type=start_type,
        start_gpi=start_gpi,
        stop_type=stop_type,
        stop_duration_ms=stop.get("DurationTriggerValue", 0),
        stop_gpi=stop_gpi,
        aispecs=aispecs,
        report_spec=report,
    )


def _parse_aispec(index: int, ai: Mapping[str, Any], reader: SpecContext) -> AISpec:
    ants = ai.get("AntennaIDs") or []
    if not ants:
        raise Rejected(StatusCode.M_FieldError, "AISpec needs at least one AntennaID")
    for a in ants:
        if a and not 1 <= a <= reader.antennas:
            raise Rejected(StatusCode.M_FieldError, f"AISpec antenna {a} unknown")
    resolved = list(range(1, reader.antennas + 1)) if 0 in ants else sorted(set(ants))
    stop = ai.get("AISpecStopTrigger")
    if stop is None:
        raise Rejected(StatusCode.M_MissingParameter, "AISpec needs AISpecStopTrigger")
    stop_type = stop["AISpecStopTriggerType"]
    gpi = None
    obs = None
    if stop_type == StopTriggerType.GPI_With_Timeout:
        g = stop.get("GPITriggerValue")
        if g is None:
            raise Rejected(StatusCode.M_MissingParameter, "GPI stop needs GPITriggerValue")
        gpi = (g["GPIPortNum"], g["GPIEvent"], g["Timeout"])
    elif stop_type == StopTriggerType.Tag_Observation:
        obs = stop.get("TagObservationTrigger")
        if obs is None:
            raise Rejected(StatusCode.M_MissingParameter, "needs TagObservationTrigger")
        if obs["TriggerType"] not in tuple(TagObservationType):
            raise Rejected(StatusCode.M_FieldError, f"TriggerType {obs['TriggerType']}")
    elif stop_type not in (StopTriggerType.Null, StopTriggerType.Duration):
        raise Rejected(StatusCode.M_FieldError, f"AISpecStopTriggerType {stop_type}")
    ipss = ai.get("InventoryParameterSpec") or []
    if not ipss:
        raise Rejected(StatusCode.M_MissingParameter, "AISpec needs InventoryParameterSpec")
    ips = ipss[0]
    if ips["ProtocolID"] != 1:
        raise Rejected(StatusCode.M_FieldError, "only EPCGlobalClass1Gen2 is supported")
    sessions: dict[int, tuple[int, int | None, bool]] = {}
    offsets: dict[int, float] = {}
    table = reader.personality.power_dbm
    configs = {a: reader.antenna_config(a) for a in resolved}
    for ac in ips.get("AntennaConfiguration", []):
        validate_antenna_config(ac, reader)
        for a in [ac["AntennaID"]] if ac["AntennaID"] else resolved:
            configs[a] = {**configs.get(a, {}), **ac}
    for a, ac in configs.items():
        cmd = (ac.get("C1G2InventoryCommand") or [{}])[0]
        single = cmd.get("C1G2SingulationControl") or {}
        mode = (cmd.get("ImpinjInventorySearchMode") or {}).get("InventorySearchMode")
        sessions[a] = (single.get("Session", 1), mode, bool(cmd.get("TagInventoryStateAware")))
        level = (ac.get("RFTransmitter") or {}).get("TransmitPower", len(table))
        offsets[a] = table[level - 1] - table[-1]
    return AISpec(
        index=index,
        antennas=resolved,
        stop_type=stop_type,
        duration_ms=stop.get("DurationTrigger", 0),
        gpi=gpi,
        observation=obs,
        ips_id=ips["InventoryParameterSpecID"],
        sessions=sessions,
        power_offset=offsets,
    )


def validate_antenna_config(ac: Mapping[str, Any], reader: SpecContext) -> None:
    """Refuse an AntennaConfiguration this reader cannot apply."""
    ant = ac.get("AntennaID", 0)
    if ant and not 1 <= ant <= reader.antennas:
        raise Rejected(StatusCode.M_ParameterError, f"AntennaConfiguration: antenna {ant} unknown")
    tx = ac.get("RFTransmitter")
    if tx is not None:
        levels = len(reader.personality.power_dbm)
        if not 1 <= tx["TransmitPower"] <= levels:
            raise Rejected(
                StatusCode.M_ParameterError,
                f"TransmitPower index {tx['TransmitPower']} outside 1..{levels}",
            )
    modes = {m[0] for m in reader.personality.modes}
    for cmd in ac.get("C1G2InventoryCommand", []):
        rf = cmd.get("C1G2RFControl")
        if rf is not None and rf["ModeIndex"] not in modes:
            raise Rejected(StatusCode.M_ParameterError, f"ModeIndex {rf['ModeIndex']} unknown")
        filters = cmd.get("C1G2Filter", [])
        if len(filters) > reader.personality.max_select_filters:
            raise Rejected(StatusCode.M_ParameterError, "too many C1G2Filter")


def validate_report_spec(spec: Mapping[str, Any]) -> None:
    """Refuse a ROReportSpec with an unknown trigger or no content selector."""
    if spec["ROReportTrigger"] not in tuple(ROReportTrigger):
        raise Rejected(StatusCode.M_ParameterError, f"ROReportTrigger {spec['ROReportTrigger']}")
    if "TagReportContentSelector" not in spec:
        raise Rejected(StatusCode.M_MissingParameter, "ROReportSpec needs TagReportContentSelector")
