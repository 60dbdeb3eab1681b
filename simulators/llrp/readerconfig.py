"""The reader's configuration: what SET_READER_CONFIG changes, what GET_READER_CONFIG and
GET_READER_CAPABILITIES report (sans-IO request handlers of ``reader.ReaderModel``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simulators.llrp.codec import (
    EventType,
    GetConfigRequest,
    Message,
    ROReportTrigger,
    StatusCode,
)
from simulators.llrp.rospec import Rejected, validate_antenna_config, validate_report_spec

if TYPE_CHECKING:
    from simulators.llrp.reader import ReaderModel, Session


def _default_report_spec() -> dict[str, Any]:
    # What a factory-fresh Speedway reports (captured GET_READER_CONFIG_RESPONSE).
    return {
        "ROReportTrigger": ROReportTrigger.Upon_N_Tags_Or_End_Of_ROSpec,
        "N": 1,
        "TagReportContentSelector": {
            "EnableROSpecID": False,
            "EnableSpecIndex": False,
            "EnableInventoryParameterSpecID": False,
            "EnableAntennaID": True,
            "EnableChannelIndex": False,
            "EnablePeakRSSI": True,
            "EnableFirstSeenTimestamp": True,
            "EnableLastSeenTimestamp": False,
            "EnableTagSeenCount": False,
            "EnableAccessSpecID": False,
            "C1G2EPCMemorySelector": [{"EnableCRC": False, "EnablePCBits": False}],
        },
    }


@dataclass
class ReaderConfig:
    """What SET_READER_CONFIG changes and GET_READER_CONFIG reports."""

    events: dict[int, bool] = field(
        default_factory=lambda: {
            int(e): e in (EventType.Reader_Exception_Event, EventType.Antenna_Event)
            for e in EventType
        }
    )
    report_spec: dict[str, Any] = field(default_factory=_default_report_spec)
    access_report_trigger: int = 1
    keepalive_ms: int = 0
    hold_events: bool = False
    antenna_configs: dict[int, dict[str, Any]] = field(default_factory=dict)
    gpi_enabled: dict[int, bool] = field(default_factory=dict)
    state_value: int = 1


def get_capabilities(reader: ReaderModel, session: Session, msg: Message) -> dict[str, Any] | None:
    caps = reader.personality.capabilities(reader.antennas)
    wanted = msg.params.get("RequestedData", 0)
    keys = {
        0: list(caps),
        1: ["GeneralDeviceCapabilities"],
        2: ["LLRPCapabilities"],
        3: ["RegulatoryCapabilities"],
        4: ["C1G2LLRPCapabilities"],
    }.get(wanted)
    if keys is None:
        raise Rejected(StatusCode.M_FieldError, f"RequestedData {wanted} unknown")
    return {k: caps[k] for k in keys}


def get_config(reader: ReaderModel, session: Session, msg: Message) -> dict[str, Any] | None:
    p = msg.params
    want = p.get("RequestedData", 0)
    if want not in tuple(GetConfigRequest):
        raise Rejected(StatusCode.M_FieldError, f"RequestedData {want} unknown")
    ant, gpi, gpo = p.get("AntennaID", 0), p.get("GPIPortNum", 0), p.get("GPOPortNum", 0)
    if ant and not 1 <= ant <= reader.antennas:
        raise Rejected(StatusCode.M_FieldError, f"AntennaID {ant} unknown")
    if gpi and gpi not in reader.gpi_state:
        raise Rejected(StatusCode.M_FieldError, f"GPIPortNum {gpi} unknown")
    if gpo and gpo not in reader.gpo:
        raise Rejected(StatusCode.M_FieldError, f"GPOPortNum {gpo} unknown")
    ants = [ant] if ant else list(range(1, reader.antennas + 1))

    def want_(kind: GetConfigRequest) -> bool:
        return want in (GetConfigRequest.All, kind)

    cfg = reader.config
    out: dict[str, Any] = {}
    if want_(GetConfigRequest.Identification):
        out["Identification"] = {"IDType": 0, "ReaderID": reader.personality.reader_id}
    if want_(GetConfigRequest.AntennaProperties) and reader.antenna_detection:
        out["AntennaProperties"] = [
            {"AntennaConnected": reader.antenna_connected[a], "AntennaID": a, "AntennaGain": 0}
            for a in ants
        ]
    if want_(GetConfigRequest.AntennaConfiguration):
        out["AntennaConfiguration"] = [antenna_config(reader, a) for a in ants]
    if want_(GetConfigRequest.ReaderEventNotificationSpec):
        out["ReaderEventNotificationSpec"] = {
            "EventNotificationState": [
                {"EventType": e, "NotificationState": on} for e, on in sorted(cfg.events.items())
            ]
        }
    if want_(GetConfigRequest.ROReportSpec):
        out["ROReportSpec"] = cfg.report_spec
    if want_(GetConfigRequest.AccessReportSpec):
        out["AccessReportSpec"] = {"AccessReportTrigger": cfg.access_report_trigger}
    if want_(GetConfigRequest.LLRPConfigurationStateValue):
        out["LLRPConfigurationStateValue"] = {"LLRPConfigurationStateValue": cfg.state_value}
    if want_(GetConfigRequest.KeepaliveSpec):
        out["KeepaliveSpec"] = {
            "KeepaliveTriggerType": 1 if cfg.keepalive_ms else 0,
            "PeriodicTriggerValue": cfg.keepalive_ms,
        }
    if want_(GetConfigRequest.GPIPortCurrentState):
        out["GPIPortCurrentState"] = [
            {
                "GPIPortNum": n,
                "Config": cfg.gpi_enabled.get(n, reader.gpi_default),
                "State": int(reader.gpi_state[n]),
            }
            for n in ([gpi] if gpi else sorted(reader.gpi_state))
        ]
    if want_(GetConfigRequest.GPOWriteData):
        out["GPOWriteData"] = [
            {"GPOPortNumber": n, "GPOData": reader.gpo[n]}
            for n in ([gpo] if gpo else sorted(reader.gpo))
        ]
    if want_(GetConfigRequest.EventsAndReports):
        out["EventsAndReports"] = {"HoldEventsAndReportsUponReconnect": cfg.hold_events}
    return out


def antenna_config(reader: ReaderModel, ant: int) -> dict[str, Any]:
    stored = reader.config.antenna_configs.get(ant)
    if stored is not None:
        return {**stored, "AntennaID": ant}
    return {
        "AntennaID": ant,
        "RFReceiver": {"ReceiverSensitivity": 1},
        "RFTransmitter": {
            "HopTableID": 1,
            "ChannelIndex": 0,
            "TransmitPower": len(reader.personality.power_dbm),
        },
        "C1G2InventoryCommand": [
            {
                "TagInventoryStateAware": False,
                "C1G2RFControl": {"ModeIndex": reader.personality.modes[-1][0], "Tari": 0},
                "C1G2SingulationControl": {
                    "Session": 1,
                    "TagPopulation": 32,
                    "TagTransitTime": 0,
                },
            }
        ],
    }


def set_config(reader: ReaderModel, session: Session, msg: Message) -> dict[str, Any] | None:
    p = msg.params
    # Validate everything before applying anything: a rejected SET changes nothing.
    for ac in p.get("AntennaConfiguration", []):
        validate_antenna_config(ac, reader)
    for w in p.get("GPOWriteData", []):
        if w["GPOPortNumber"] not in reader.gpo:
            raise Rejected(
                StatusCode.M_ParameterError, f"GPOPortNumber {w['GPOPortNumber']} unknown"
            )
    for g in p.get("GPIPortCurrentState", []):
        if g["GPIPortNum"] not in reader.gpi_state:
            raise Rejected(StatusCode.M_ParameterError, f"GPIPortNum {g['GPIPortNum']} unknown")
    keep = p.get("KeepaliveSpec")
    if keep is not None and keep["KeepaliveTriggerType"] not in (0, 1):
        raise Rejected(StatusCode.M_ParameterError, "KeepaliveTriggerType unknown")
    report = p.get("ROReportSpec")
    if report is not None:
        validate_report_spec(report)

    cfg = reader.config
    if p.get("ResetToFactoryDefault"):
        for rs in list(reader.rospecs.values()):
            reader.halt(rs, report=False)
        reader.rospecs.clear()
        reader.access_specs.clear()
        reader.config = cfg = ReaderConfig()
        session.restart_keepalive()
    for st in (p.get("ReaderEventNotificationSpec") or {}).get("EventNotificationState", []):
        cfg.events[st["EventType"]] = st["NotificationState"]
    for ac in p.get("AntennaConfiguration", []):
        targets = [ac["AntennaID"]] if ac["AntennaID"] else range(1, reader.antennas + 1)
        for a in targets:
            cfg.antenna_configs[a] = {**antenna_config(reader, a), **ac, "AntennaID": a}
    if report is not None:
        cfg.report_spec = report
    if "AccessReportSpec" in p:
        cfg.access_report_trigger = p["AccessReportSpec"]["AccessReportTrigger"]
    if keep is not None:
        cfg.keepalive_ms = keep["PeriodicTriggerValue"] if keep["KeepaliveTriggerType"] else 0
        session.restart_keepalive()
    if "EventsAndReports" in p:
        cfg.hold_events = p["EventsAndReports"]["HoldEventsAndReportsUponReconnect"]
    for g in p.get("GPIPortCurrentState", []):
        cfg.gpi_enabled[g["GPIPortNum"]] = g["Config"]
    for w in p.get("GPOWriteData", []):
        reader.write_gpo(w["GPOPortNumber"], w["GPOData"])
    cfg.state_value += 1
    return {}
