"""LLRP 1.0.1 binary codec: a schema-driven, length-bounded, sans-IO encoder/decoder.

Independent of sllurp on purpose (it is the project's cross-check). Values are plain dicts:
fields by name, sub-parameters by name (a list when the parameter may repeat), TV parameters with
a single field collapsed to that value, unknown vendor parameters under ``"Custom"`` as
``{"VendorID", "Subtype", "Data"}``. Enumerated fields stay ints; see the IntEnums below.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

LLRP_VERSION = 1
TYPE_CUSTOM = 1023
HEADER = struct.Struct("!HII")
HEADER_LEN = HEADER.size
CUSTOM_MSG_EXTRA = struct.Struct("!IB")
DEFAULT_MAX_MESSAGE_LEN = 1 << 20
MAX_DEPTH = 24
VENDOR_IMPINJ = 25882
VENDOR_ZEBRA = 10642


class StatusCode(IntEnum):
    """LLRPStatus codes (LLRP 1.0.1 §14.2.8.1)."""

    M_Success = 0
    M_ParameterError = 100
    M_FieldError = 101
    M_UnexpectedParameter = 102
    M_MissingParameter = 103
    M_DuplicateParameter = 104
    M_OverflowParameter = 105
    M_OverflowField = 106
    M_UnknownParameter = 107
    M_UnknownField = 108
    M_UnsupportedMessage = 109
    M_UnsupportedVersion = 110
    M_UnsupportedParameter = 111
    P_ParameterError = 200
    P_FieldError = 201
    P_UnexpectedParameter = 202
    P_MissingParameter = 203
    P_DuplicateParameter = 204
    P_OverflowParameter = 205
    P_OverflowField = 206
    P_UnknownParameter = 207
    P_UnknownField = 208
    P_UnsupportedParameter = 209
    A_Invalid = 300
    A_OutOfRange = 301
    R_DeviceError = 401


class ConnectionAttemptStatus(IntEnum):
    """ConnectionAttemptEvent.Status."""

    Success = 0
    Failed_Reader_Initiated_Connection_Already_Exists = 1
    Failed_Client_Initiated_Connection_Already_Exists = 2
    Failed_Any_Other_Reason = 3
    Another_Connection_Attempted = 4


class ROSpecState(IntEnum):
    Disabled = 0
    Inactive = 1
    Active = 2


class StartTriggerType(IntEnum):
    Null = 0
    Immediate = 1
    Periodic = 2
    GPI = 3


class StopTriggerType(IntEnum):
    """ROSpecStopTrigger types (AISpecStopTrigger adds Tag_Observation = 3)."""

    Null = 0
    Duration = 1
    GPI_With_Timeout = 2
    Tag_Observation = 3


class TagObservationType(IntEnum):
    Upon_Seeing_N_Tags_Or_Timeout = 0
    Upon_Seeing_No_More_New_Tags_For_Tms_Or_Timeout = 1
    N_Attempts_To_See_All_Tags_In_FOV_Or_Timeout = 2
    Upon_Seeing_N_Unique_Tags_Or_Timeout = 3
    Upon_Seeing_No_More_New_Unique_Tags_For_Tms_Or_Timeout = 4


class ROReportTrigger(IntEnum):
    None_ = 0
    Upon_N_Tags_Or_End_Of_AISpec = 1
    Upon_N_Tags_Or_End_Of_ROSpec = 2


class EventType(IntEnum):
    """EventNotificationState.EventType."""

    Upon_Hopping_To_Next_Channel = 0
    GPI_Event = 1
    ROSpec_Event = 2
    Report_Buffer_Fill_Warning = 3
    Reader_Exception_Event = 4
    RFSurvey_Event = 5
    AISpec_Event = 6
    AISpec_Event_With_Details = 7
    Antenna_Event = 8


class GetConfigRequest(IntEnum):
    All = 0
    Identification = 1
    AntennaProperties = 2
    AntennaConfiguration = 3
    ROReportSpec = 4
    ReaderEventNotificationSpec = 5
    AccessReportSpec = 6
    LLRPConfigurationStateValue = 7
    KeepaliveSpec = 8
    GPIPortCurrentState = 9
    GPOWriteData = 10
    EventsAndReports = 11


class LlrpCodecError(ValueError):
    """A message or parameter that cannot be encoded/decoded; carries the LLRP status to report."""

    def __init__(
        self, message: str, status: StatusCode = StatusCode.M_ParameterError, param_type: int = 0
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param_type = param_type


class FramingError(LlrpCodecError):
    """The byte stream cannot be re-synchronised (bad length): the connection must end."""


@dataclass(frozen=True)
class Bits:
    """An LLRP bit array (u1v): ``count`` bits, MSB-first in ``data`` (padded to whole bytes)."""

    count: int
    data: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.count <= 0xFFFF or len(self.data) != (self.count + 7) // 8:
            raise ValueError(f"Bits: {self.count} bits do not fit {len(self.data)} bytes")

    @classmethod
    def from_hex(cls, hexstr: str) -> Bits:
        """Whole bytes from a hex string (``"3008..."``)."""
        data = bytes.fromhex(hexstr)
        return cls(len(data) * 8, data)


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------

_INT_KINDS: dict[str, struct.Struct] = {
    "u8": struct.Struct("!B"),
    "u16": struct.Struct("!H"),
    "u32": struct.Struct("!I"),
    "u64": struct.Struct("!Q"),
    "s8": struct.Struct("!b"),
    "s16": struct.Struct("!h"),
}
_VEC_KINDS: dict[str, struct.Struct] = {
    "u8v": struct.Struct("!B"),
    "u16v": struct.Struct("!H"),
    "u32v": struct.Struct("!I"),
}


@dataclass(frozen=True)
class FieldDef:
    """One field. ``kind``: bits (n-bit unsigned), rsv (n reserved bits), u8..u64, s8, s16, u96,
    u8v/u16v/u32v (u16 count + items), u1v (u16 bit count + bytes), utf8v, bytes (to the end)."""

    name: str
    kind: str
    bits: int = 0


def _b(name: str, n: int = 1) -> FieldDef:
    return FieldDef(name, "bits", n)


def _rsv(n: int) -> FieldDef:
    return FieldDef("", "rsv", n)


def _f(name: str, kind: str) -> FieldDef:
    return FieldDef(name, kind)


@dataclass(frozen=True)
class ParamDef:
    """A parameter (or, with ``is_message``, a message) type."""

    name: str
    type_num: int
    fields: tuple[FieldDef, ...] = ()
    children: tuple[tuple[str, bool], ...] = ()  # (name, may repeat), in encoding order
    tv: bool = False
    vendor: int = 0
    subtype: int = 0
    is_message: bool = False

    @property
    def scalar(self) -> bool:
        return self.tv and len(self.fields) == 1

    @property
    def tv_len(self) -> int:
        return 1 + sum(_fixed_size(f) for f in self.fields)


def _fixed_size(fd: FieldDef) -> int:
    if fd.kind in _INT_KINDS:
        return _INT_KINDS[fd.kind].size
    if fd.kind == "u96":
        return 12
    raise AssertionError(f"TV field {fd.name} must be fixed size")


PARAMS: dict[str, ParamDef] = {}
MESSAGES: dict[str, ParamDef] = {}
_PARAM_BY_TYPE: dict[tuple[int, int, int], ParamDef] = {}
_MSG_BY_TYPE: dict[tuple[int, int, int], ParamDef] = {}


def _param(
    name: str,
    type_num: int,
    fields: Iterable[FieldDef] = (),
    children: Iterable[str] = (),
    *,
    tv: bool = False,
    vendor: int = 0,
    subtype: int = 0,
) -> None:
    kids = tuple((c.rstrip("*"), c.endswith("*")) for c in children)
    pd = ParamDef(name, type_num, tuple(fields), kids, tv, vendor, subtype)
    PARAMS[name] = pd
    _PARAM_BY_TYPE[(type_num, vendor, subtype)] = pd


def _message(
    name: str,
    type_num: int,
    fields: Iterable[FieldDef] = (),
    children: Iterable[str] = (),
    *,
    vendor: int = 0,
    subtype: int = 0,
) -> None:
    kids = tuple((c.rstrip("*"), c.endswith("*")) for c in children)
    md = ParamDef(name, type_num, tuple(fields), kids, False, vendor, subtype, is_message=True)
    MESSAGES[name] = md
    _MSG_BY_TYPE[(type_num, vendor, subtype)] = md


# TV parameters (LLRP 1.0.1 §15.2.2 / §16.2)
for _name, _num, _kind in (
    ("AntennaID", 1, "u16"),
    ("FirstSeenTimestampUTC", 2, "u64"),
    ("FirstSeenTimestampUptime", 3, "u64"),
    ("LastSeenTimestampUTC", 4, "u64"),
    ("LastSeenTimestampUptime", 5, "u64"),
    ("PeakRSSI", 6, "s8"),
    ("ChannelIndex", 7, "u16"),
    ("TagSeenCount", 8, "u16"),
    ("ROSpecID", 9, "u32"),
    ("InventoryParameterSpecID", 10, "u16"),
    ("C1G2_CRC", 11, "u16"),
    ("C1G2_PC", 12, "u16"),
    ("EPC_96", 13, "u96"),
    ("SpecIndex", 14, "u16"),
    ("ClientRequestOpSpecResult", 15, "u16"),
    ("AccessSpecID", 16, "u32"),
    ("OpSpecID", 17, "u16"),
):
    _param(_name, _num, [_f(_name, _kind)], tv=True)
_param(
    "C1G2SingulationDetails",
    18,
    [_f("NumCollisionSlots", "u16"), _f("NumEmptySlots", "u16")],
    tv=True,
)

_param("UTCTimestamp", 128, [_f("Microseconds", "u64")])
_param("Uptime", 129, [_f("Microseconds", "u64")])
_param(
    "GeneralDeviceCapabilities",
    137,
    [
        _f("MaxNumberOfAntennaSupported", "u16"),
        _b("CanSetAntennaProperties"),
        _b("HasUTCClockCapability"),
        _rsv(14),
        _f("DeviceManufacturerName", "u32"),
        _f("ModelName", "u32"),
        _f("ReaderFirmwareVersion", "utf8v"),
    ],
    [
        "ReceiveSensitivityTableEntry*",
        "PerAntennaReceiveSensitivityRange*",
        "GPIOCapabilities",
        "PerAntennaAirProtocol*",
    ],
)
_param(
    "ReceiveSensitivityTableEntry",
    139,
    [_f("Index", "u16"), _f("ReceiveSensitivityValue", "s16")],
)
_param("PerAntennaAirProtocol", 140, [_f("AntennaID", "u16"), _f("ProtocolID", "u8v")])
_param("GPIOCapabilities", 141, [_f("NumGPIs", "u16"), _f("NumGPOs", "u16")])
_param(
    "LLRPCapabilities",
    142,
    [
        _b("CanDoRFSurvey"),
        _b("CanReportBufferFillWarning"),
        _b("SupportsClientRequestOpSpec"),
        _b("CanDoTagInventoryStateAwareSingulation"),
        _b("SupportsEventAndReportHolding"),
        _rsv(3),
        _f("MaxNumPriorityLevelsSupported", "u8"),
        _f("ClientRequestOpSpecTimeout", "u16"),
        _f("MaxNumROSpecs", "u32"),
        _f("MaxNumSpecsPerROSpec", "u32"),
        _f("MaxNumInventoryParameterSpecsPerAISpec", "u32"),
        _f("MaxNumAccessSpecs", "u32"),
        _f("MaxNumOpSpecsPerAccessSpec", "u32"),
    ],
)
_param(
    "RegulatoryCapabilities",
    143,
    [_f("CountryCode", "u16"), _f("CommunicationsStandard", "u16")],
    ["UHFBandCapabilities"],
)
_param(
    "UHFBandCapabilities",
    144,
    (),
    ["TransmitPowerLevelTableEntry*", "FrequencyInformation", "UHFC1G2RFModeTable"],
)
_param("TransmitPowerLevelTableEntry", 145, [_f("Index", "u16"), _f("TransmitPowerValue", "s16")])
_param(
    "FrequencyInformation",
    146,
    [_b("Hopping"), _rsv(7)],
    ["FrequencyHopTable*", "FixedFrequencyTable"],
)
_param("FrequencyHopTable", 147, [_f("HopTableID", "u8"), _rsv(8), _f("Frequency", "u32v")])
_param("FixedFrequencyTable", 148, [_f("Frequency", "u32v")])
_param(
    "PerAntennaReceiveSensitivityRange",
    149,
    [
        _f("AntennaID", "u16"),
        _f("ReceiveSensitivityIndexMin", "u16"),
        _f("ReceiveSensitivityIndexMax", "u16"),
    ],
)
_param(
    "ROSpec",
    177,
    [_f("ROSpecID", "u32"), _f("Priority", "u8"), _f("CurrentState", "u8")],
    ["ROBoundarySpec", "AISpec*", "RFSurveySpec*", "ROReportSpec"],
)
_param("ROBoundarySpec", 178, (), ["ROSpecStartTrigger", "ROSpecStopTrigger"])
_param(
    "ROSpecStartTrigger",
    179,
    [_f("ROSpecStartTriggerType", "u8")],
    ["PeriodicTriggerValue", "GPITriggerValue"],
)
_param("PeriodicTriggerValue", 180, [_f("Offset", "u32"), _f("Period", "u32")], ["UTCTimestamp"])
_param(
    "GPITriggerValue",
    181,
    [_f("GPIPortNum", "u16"), _b("GPIEvent"), _rsv(7), _f("Timeout", "u32")],
)
_param(
    "ROSpecStopTrigger",
    182,
    [_f("ROSpecStopTriggerType", "u8"), _f("DurationTriggerValue", "u32")],
    ["GPITriggerValue"],
)
_param(
    "AISpec",
    183,
    [_f("AntennaIDs", "u16v")],
    ["AISpecStopTrigger", "InventoryParameterSpec*"],
)
_param(
    "AISpecStopTrigger",
    184,
    [_f("AISpecStopTriggerType", "u8"), _f("DurationTrigger", "u32")],
    ["GPITriggerValue", "TagObservationTrigger"],
)
_param(
    "TagObservationTrigger",
    185,
    [
        _f("TriggerType", "u8"),
        _rsv(8),
        _f("NumberOfTags", "u16"),
        _f("NumberOfAttempts", "u16"),
        _f("T", "u16"),
        _f("Timeout", "u32"),
    ],
)
_param(
    "InventoryParameterSpec",
    186,
    [_f("InventoryParameterSpecID", "u16"), _f("ProtocolID", "u8")],
    ["AntennaConfiguration*"],
)
_param(
    "RFSurveySpec",
    187,
    [_f("AntennaID", "u16"), _f("StartFrequency", "u32"), _f("EndFrequency", "u32")],
    ["RFSurveySpecStopTrigger"],
)
_param(
    "RFSurveySpecStopTrigger",
    188,
    [_f("StopTriggerType", "u8"), _f("DurationPeriod", "u32"), _f("N", "u32")],
)
_param(
    "AccessSpec",
    207,
    [
        _f("AccessSpecID", "u32"),
        _f("AntennaID", "u16"),
        _f("ProtocolID", "u8"),
        _b("CurrentState"),
        _rsv(7),
        _f("ROSpecID", "u32"),
    ],
    ["AccessSpecStopTrigger", "AccessCommand", "AccessReportSpec"],
)
_param(
    "AccessSpecStopTrigger",
    208,
    [_f("AccessSpecStopTrigger", "u8"), _f("OperationCountValue", "u16")],
)
_param(
    "AccessCommand",
    209,
    (),
    [
        "C1G2TagSpec",
        "C1G2Read*",
        "C1G2Write*",
        "C1G2Kill*",
        "C1G2Lock*",
        "C1G2BlockErase*",
        "C1G2BlockWrite*",
    ],
)
_param("LLRPConfigurationStateValue", 217, [_f("LLRPConfigurationStateValue", "u32")])
_param("Identification", 218, [_f("IDType", "u8"), _f("ReaderID", "u8v")])
_param("GPOWriteData", 219, [_f("GPOPortNumber", "u16"), _b("GPOData"), _rsv(7)])
_param(
    "KeepaliveSpec",
    220,
    [_f("KeepaliveTriggerType", "u8"), _f("PeriodicTriggerValue", "u32")],
)
_param(
    "AntennaProperties",
    221,
    [_b("AntennaConnected"), _rsv(7), _f("AntennaID", "u16"), _f("AntennaGain", "s16")],
)
_param(
    "AntennaConfiguration",
    222,
    [_f("AntennaID", "u16")],
    ["RFReceiver", "RFTransmitter", "C1G2InventoryCommand*"],
)
_param("RFReceiver", 223, [_f("ReceiverSensitivity", "u16")])
_param(
    "RFTransmitter",
    224,
    [_f("HopTableID", "u16"), _f("ChannelIndex", "u16"), _f("TransmitPower", "u16")],
)
_param(
    "GPIPortCurrentState",
    225,
    [_f("GPIPortNum", "u16"), _b("Config"), _rsv(7), _f("State", "u8")],
)
_param("EventsAndReports", 226, [_b("HoldEventsAndReportsUponReconnect"), _rsv(7)])
_param(
    "ROReportSpec",
    237,
    [_f("ROReportTrigger", "u8"), _f("N", "u16")],
    ["TagReportContentSelector"],
)
_param(
    "TagReportContentSelector",
    238,
    [
        _b("EnableROSpecID"),
        _b("EnableSpecIndex"),
        _b("EnableInventoryParameterSpecID"),
        _b("EnableAntennaID"),
        _b("EnableChannelIndex"),
        _b("EnablePeakRSSI"),
        _b("EnableFirstSeenTimestamp"),
        _b("EnableLastSeenTimestamp"),
        _b("EnableTagSeenCount"),
        _b("EnableAccessSpecID"),
        _rsv(6),
    ],
    ["C1G2EPCMemorySelector*"],
)
_param("AccessReportSpec", 239, [_f("AccessReportTrigger", "u8")])
_param(
    "TagReportData",
    240,
    (),
    [
        "EPCData",
        "EPC_96",
        "ROSpecID",
        "SpecIndex",
        "InventoryParameterSpecID",
        "AntennaID",
        "PeakRSSI",
        "ChannelIndex",
        "FirstSeenTimestampUTC",
        "FirstSeenTimestampUptime",
        "LastSeenTimestampUTC",
        "LastSeenTimestampUptime",
        "TagSeenCount",
        "C1G2_PC",
        "C1G2_CRC",
        "AccessSpecID",
        "C1G2ReadOpSpecResult*",
        "C1G2WriteOpSpecResult*",
        "C1G2KillOpSpecResult*",
        "C1G2LockOpSpecResult*",
        "C1G2BlockEraseOpSpecResult*",
        "C1G2BlockWriteOpSpecResult*",
    ],
)
_param("EPCData", 241, [_f("EPC", "u1v")])
_param(
    "RFSurveyReportData",
    242,
    (),
    ["ROSpecID", "SpecIndex", "FrequencyRSSILevelEntry*"],
)
_param(
    "FrequencyRSSILevelEntry",
    243,
    [
        _f("Frequency", "u32"),
        _f("Bandwidth", "u32"),
        _f("AverageRSSI", "s8"),
        _f("PeakRSSI", "s8"),
    ],
    ["UTCTimestamp", "Uptime"],
)
_param("ReaderEventNotificationSpec", 244, (), ["EventNotificationState*"])
_param(
    "EventNotificationState",
    245,
    [_f("EventType", "u16"), _b("NotificationState"), _rsv(7)],
)
_param(
    "ReaderEventNotificationData",
    246,
    (),
    [
        "UTCTimestamp",
        "Uptime",
        "HoppingEvent",
        "GPIEvent",
        "ROSpecEvent",
        "ReportBufferLevelWarningEvent",
        "ReportBufferOverflowErrorEvent",
        "ReaderExceptionEvent",
        "RFSurveyEvent",
        "AISpecEvent",
        "AntennaEvent",
        "ConnectionAttemptEvent",
        "ConnectionCloseEvent",
    ],
)
_param("HoppingEvent", 247, [_f("HopTableID", "u16"), _f("NextChannelIndex", "u16")])
_param("GPIEvent", 248, [_f("GPIPortNumber", "u16"), _b("GPIEvent"), _rsv(7)])
_param(
    "ROSpecEvent",
    249,
    [_f("EventType", "u8"), _f("ROSpecID", "u32"), _f("PreemptingROSpecID", "u32")],
)
_param("ReportBufferLevelWarningEvent", 250, [_f("ReportBufferPercentageFull", "u8")])
_param("ReportBufferOverflowErrorEvent", 251)
_param(
    "ReaderExceptionEvent",
    252,
    [_f("Message", "utf8v")],
    [
        "ROSpecID",
        "SpecIndex",
        "InventoryParameterSpecID",
        "AntennaID",
        "AccessSpecID",
        "OpSpecID",
    ],
)
_param(
    "RFSurveyEvent",
    253,
    [_f("EventType", "u8"), _f("ROSpecID", "u32"), _f("SpecIndex", "u16")],
)
_param(
    "AISpecEvent",
    254,
    [_f("EventType", "u8"), _f("ROSpecID", "u32"), _f("SpecIndex", "u16")],
    ["C1G2SingulationDetails"],
)
_param("AntennaEvent", 255, [_f("EventType", "u8"), _f("AntennaID", "u16")])
_param("ConnectionAttemptEvent", 256, [_f("Status", "u16")])
_param("ConnectionCloseEvent", 257)
_param(
    "LLRPStatus",
    287,
    [_f("StatusCode", "u16"), _f("ErrorDescription", "utf8v")],
    ["FieldError", "ParameterError"],
)
_param("FieldError", 288, [_f("FieldNum", "u16"), _f("ErrorCode", "u16")])
_param(
    "ParameterError",
    289,
    [_f("ParameterType", "u16"), _f("ErrorCode", "u16")],
    ["FieldError", "ParameterError"],
)
_param(
    "C1G2LLRPCapabilities",
    327,
    [
        _b("CanSupportBlockErase"),
        _b("CanSupportBlockWrite"),
        _rsv(6),
        _f("MaxNumSelectFiltersPerQuery", "u16"),
    ],
)
_param("UHFC1G2RFModeTable", 328, (), ["UHFC1G2RFModeTableEntry*"])
_param(
    "UHFC1G2RFModeTableEntry",
    329,
    [
        _f("ModeIdentifier", "u32"),
        _b("DRValue"),
        _b("EPCHAGTCConformance"),
        _rsv(6),
        _f("MValue", "u8"),
        _f("ForwardLinkModulation", "u8"),
        _f("SpectralMaskIndicator", "u8"),
        _f("BDRValue", "u32"),
        _f("PIEValue", "u32"),
        _f("MinTariValue", "u32"),
        _f("MaxTariValue", "u32"),
        _f("StepTariValue", "u32"),
    ],
)
_param(
    "C1G2InventoryCommand",
    330,
    [_b("TagInventoryStateAware"), _rsv(7)],
    ["C1G2Filter*", "C1G2RFControl", "C1G2SingulationControl"],
)
_param(
    "C1G2Filter",
    331,
    [_b("T", 2), _rsv(6)],
    [
        "C1G2TagInventoryMask",
        "C1G2TagInventoryStateAwareFilterAction",
        "C1G2TagInventoryStateUnawareFilterAction",
    ],
)
_param(
    "C1G2TagInventoryMask",
    332,
    [_b("MB", 2), _rsv(6), _f("Pointer", "u16"), _f("TagMask", "u1v")],
)
_param("C1G2TagInventoryStateAwareFilterAction", 333, [_f("Target", "u8"), _f("Action", "u8")])
_param("C1G2TagInventoryStateUnawareFilterAction", 334, [_f("Action", "u8")])
_param("C1G2RFControl", 335, [_f("ModeIndex", "u16"), _f("Tari", "u16")])
_param(
    "C1G2SingulationControl",
    336,
    [_b("Session", 2), _rsv(6), _f("TagPopulation", "u16"), _f("TagTransitTime", "u32")],
    ["C1G2TagInventoryStateAwareSingulationAction"],
)
_param("C1G2TagInventoryStateAwareSingulationAction", 337, [_b("I"), _b("S"), _rsv(6)])
_param("C1G2TagSpec", 338, (), ["C1G2TargetTag*"])
_param(
    "C1G2TargetTag",
    339,
    [
        _b("MB", 2),
        _b("Match"),
        _rsv(5),
        _f("Pointer", "u16"),
        _f("TagMask", "u1v"),
        _f("TagData", "u1v"),
    ],
)
_OP_HEAD = [_f("OpSpecID", "u16"), _f("AccessPassword", "u32")]
_param(
    "C1G2Read",
    341,
    [*_OP_HEAD, _b("MB", 2), _rsv(6), _f("WordPointer", "u16"), _f("WordCount", "u16")],
)
_param(
    "C1G2Write",
    342,
    [*_OP_HEAD, _b("MB", 2), _rsv(6), _f("WordPointer", "u16"), _f("WriteData", "u16v")],
)
_param("C1G2Kill", 343, [_f("OpSpecID", "u16"), _f("KillPassword", "u32")])
_param("C1G2Lock", 344, _OP_HEAD, ["C1G2LockPayload*"])
_param("C1G2LockPayload", 345, [_f("Privilege", "u8"), _f("DataField", "u8")])
_param(
    "C1G2BlockErase",
    346,
    [*_OP_HEAD, _b("MB", 2), _rsv(6), _f("WordPointer", "u16"), _f("WordCount", "u16")],
)
_param(
    "C1G2BlockWrite",
    347,
    [*_OP_HEAD, _b("MB", 2), _rsv(6), _f("WordPointer", "u16"), _f("WriteData", "u16v")],
)
_param("C1G2EPCMemorySelector", 348, [_b("EnableCRC"), _b("EnablePCBits"), _rsv(6)])
_RESULT_HEAD = [_f("Result", "u8"), _f("OpSpecID", "u16")]
_param("C1G2ReadOpSpecResult", 349, [*_RESULT_HEAD, _f("ReadData", "u16v")])
_param("C1G2WriteOpSpecResult", 350, [*_RESULT_HEAD, _f("NumWordsWritten", "u16")])
_param("C1G2KillOpSpecResult", 351, _RESULT_HEAD)
_param("C1G2LockOpSpecResult", 352, _RESULT_HEAD)
_param("C1G2BlockEraseOpSpecResult", 353, _RESULT_HEAD)
_param("C1G2BlockWriteOpSpecResult", 354, [*_RESULT_HEAD, _f("NumWordsWritten", "u16")])

# Impinj vendor parameters (Octane LLRP): the ones sllurp sends and the report fields they enable.
for _name, _sub, _fname, _kind in (
    ("ImpinjRequestedData", 21, "RequestedData", "u32"),
    ("ImpinjSubRegulatoryRegion", 22, "RegulatoryRegion", "u16"),
    ("ImpinjInventorySearchMode", 23, "InventorySearchMode", "u16"),
    ("ImpinjEnableSerializedTID", 51, "SerializedTIDMode", "u16"),
    ("ImpinjEnableRFPhaseAngle", 52, "RFPhaseAngleMode", "u16"),
    ("ImpinjEnablePeakRSSI", 53, "PeakRSSIMode", "u16"),
    ("ImpinjEnableGPSCoordinates", 54, "GPSCoordinatesMode", "u16"),
    ("ImpinjRFPhaseAngle", 56, "PhaseAngle", "u16"),
    ("ImpinjPeakRSSI", 57, "RSSI", "s16"),
    ("ImpinjEnableOptimizedRead", 65, "OptimizedReadMode", "u16"),
    ("ImpinjEnableRFDopplerFrequency", 67, "RFDopplerFrequencyMode", "u16"),
    ("ImpinjRFDopplerFrequency", 68, "DopplerFrequency", "s16"),
    ("ImpinjEnableTxPower", 72, "TxPowerReportingMode", "u16"),
    ("ImpinjTxPower", 73, "TxPower", "u16"),
):
    _param(_name, TYPE_CUSTOM, [_f(_fname, _kind)], vendor=VENDOR_IMPINJ, subtype=_sub)
_param(
    "ImpinjTagReportContentSelector",
    TYPE_CUSTOM,
    (),
    [
        "ImpinjEnableSerializedTID",
        "ImpinjEnableRFPhaseAngle",
        "ImpinjEnablePeakRSSI",
        "ImpinjEnableGPSCoordinates",
        "ImpinjEnableOptimizedRead",
        "ImpinjEnableRFDopplerFrequency",
        "ImpinjEnableTxPower",
    ],
    vendor=VENDOR_IMPINJ,
    subtype=50,
)

# Messages (LLRP 1.0.1 §16.1)
_STATUS = ["LLRPStatus"]
_message("GET_READER_CAPABILITIES", 1, [_f("RequestedData", "u8")])
_message(
    "GET_READER_CONFIG",
    2,
    [
        _f("AntennaID", "u16"),
        _f("RequestedData", "u8"),
        _f("GPIPortNum", "u16"),
        _f("GPOPortNum", "u16"),
    ],
)
_message(
    "SET_READER_CONFIG",
    3,
    [_b("ResetToFactoryDefault"), _rsv(7)],
    [
        "ReaderEventNotificationSpec",
        "AntennaProperties*",
        "AntennaConfiguration*",
        "ROReportSpec",
        "AccessReportSpec",
        "KeepaliveSpec",
        "GPOWriteData*",
        "GPIPortCurrentState*",
        "EventsAndReports",
    ],
)
_message("CLOSE_CONNECTION_RESPONSE", 4, (), _STATUS)
_message(
    "GET_READER_CAPABILITIES_RESPONSE",
    11,
    (),
    [
        "LLRPStatus",
        "GeneralDeviceCapabilities",
        "LLRPCapabilities",
        "RegulatoryCapabilities",
        "C1G2LLRPCapabilities",
    ],
)
_message(
    "GET_READER_CONFIG_RESPONSE",
    12,
    (),
    [
        "LLRPStatus",
        "Identification",
        "AntennaProperties*",
        "AntennaConfiguration*",
        "ReaderEventNotificationSpec",
        "ROReportSpec",
        "AccessReportSpec",
        "LLRPConfigurationStateValue",
        "KeepaliveSpec",
        "GPIPortCurrentState*",
        "GPOWriteData*",
        "EventsAndReports",
    ],
)
_message("SET_READER_CONFIG_RESPONSE", 13, (), _STATUS)
_message("CLOSE_CONNECTION", 14)
_message("ADD_ROSPEC", 20, (), ["ROSpec"])
for _name, _num in (
    ("DELETE_ROSPEC", 21),
    ("START_ROSPEC", 22),
    ("STOP_ROSPEC", 23),
    ("ENABLE_ROSPEC", 24),
    ("DISABLE_ROSPEC", 25),
):
    _message(_name, _num, [_f("ROSpecID", "u32")])
    _message(f"{_name}_RESPONSE", _num + 10, (), _STATUS)
_message("ADD_ROSPEC_RESPONSE", 30, (), _STATUS)
_message("GET_ROSPECS", 26)
_message("GET_ROSPECS_RESPONSE", 36, (), ["LLRPStatus", "ROSpec*"])
_message("ADD_ACCESSSPEC", 40, (), ["AccessSpec"])
_message("ADD_ACCESSSPEC_RESPONSE", 50, (), _STATUS)
for _name, _num in (
    ("DELETE_ACCESSSPEC", 41),
    ("ENABLE_ACCESSSPEC", 42),
    ("DISABLE_ACCESSSPEC", 43),
):
    _message(_name, _num, [_f("AccessSpecID", "u32")])
    _message(f"{_name}_RESPONSE", _num + 10, (), _STATUS)
_message("GET_ACCESSSPECS", 44)
_message("GET_ACCESSSPECS_RESPONSE", 54, (), ["LLRPStatus", "AccessSpec*"])
_message("GET_REPORT", 60)
_message("RO_ACCESS_REPORT", 61, (), ["TagReportData*", "RFSurveyReportData*"])
_message("KEEPALIVE", 62)
_message("READER_EVENT_NOTIFICATION", 63, (), ["ReaderEventNotificationData"])
_message("ENABLE_EVENTS_AND_REPORTS", 64)
_message("KEEPALIVE_ACK", 72)
_message("ERROR_MESSAGE", 100, (), _STATUS)
_message("IMPINJ_ENABLE_EXTENSIONS", TYPE_CUSTOM, [_rsv(32)], vendor=VENDOR_IMPINJ, subtype=21)
_message(
    "IMPINJ_ENABLE_EXTENSIONS_RESPONSE", TYPE_CUSTOM, (), _STATUS, vendor=VENDOR_IMPINJ, subtype=22
)
# Any other vendor message: VendorID/Subtype from the header, the rest as Data.
_message("CUSTOM_MESSAGE", TYPE_CUSTOM, [_f("Data", "bytes")])


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One LLRP message as framed on the wire: header fields plus the body after the header."""

    version: int
    type_num: int
    msg_id: int
    body: bytes

    @property
    def raw(self) -> bytes:
        return (
            HEADER.pack(
                (self.version << 10) | self.type_num, HEADER_LEN + len(self.body), self.msg_id
            )
            + self.body
        )


@dataclass
class FrameReader:
    """Splits a byte stream into frames; every length is bounded, the buffer never exceeds one frame.

    ``feed`` raises :class:`FramingError` when a header announces an impossible length; the
    stream cannot be re-synchronised after that and the connection must be closed.
    """

    max_message_len: int = DEFAULT_MAX_MESSAGE_LEN
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_LEN:
            word, length, msg_id = HEADER.unpack_from(self._buf)
            if length < HEADER_LEN or length > self.max_message_len:
                self._buf.clear()
                raise FramingError(
                    f"message length {length} outside [{HEADER_LEN}, {self.max_message_len}]",
                    StatusCode.M_OverflowField if length > HEADER_LEN else StatusCode.M_FieldError,
                )
            if len(self._buf) < length:
                break
            body = bytes(self._buf[HEADER_LEN:length])
            del self._buf[:length]
            frames.append(Frame((word >> 10) & 0x7, word & 0x3FF, msg_id, body))
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A decoded LLRP message."""

    name: str
    msg_id: int
    params: dict[str, Any]
    version: int = LLRP_VERSION
    type_num: int = 0
    vendor: int = 0
    subtype: int = 0


def message_def(type_num: int, vendor: int = 0, subtype: int = 0) -> ParamDef | None:
    """The schema for a message type, ``None`` when the codec does not know it."""
    return _MSG_BY_TYPE.get((type_num, vendor, subtype))


def decode_frame(frame: Frame) -> Message:
    """Decode a frame's body; raises :class:`LlrpCodecError` (with the status to report)."""
    body = frame.body
    vendor = subtype = 0
    pos = 0
    if frame.type_num == TYPE_CUSTOM:
        if len(body) < CUSTOM_MSG_EXTRA.size:
            raise LlrpCodecError("custom message shorter than its vendor header")
        vendor, subtype = CUSTOM_MSG_EXTRA.unpack_from(body)
        pos = CUSTOM_MSG_EXTRA.size
    md = _MSG_BY_TYPE.get((frame.type_num, vendor, subtype))
    if md is None and frame.type_num == TYPE_CUSTOM:
        md = MESSAGES["CUSTOM_MESSAGE"]
    if md is None:
        raise LlrpCodecError(
            f"unsupported message type {frame.type_num}", StatusCode.M_UnsupportedMessage
        )
    params = _decode_body(md, body, pos, len(body), 0)
    return Message(md.name, frame.msg_id, params, frame.version, frame.type_num, vendor, subtype)


def decode_message(data: bytes, max_message_len: int = DEFAULT_MAX_MESSAGE_LEN) -> Message:
    """Decode exactly one complete message (header + body)."""
    reader = FrameReader(max_message_len)
    frames = reader.feed(data)
    if len(frames) != 1 or reader.buffered:
        raise FramingError("expected exactly one complete message")
    return decode_frame(frames[0])


def encode_message(
    name: str,
    params: Mapping[str, Any] | None = None,
    msg_id: int = 0,
    *,
    version: int = LLRP_VERSION,
    vendor: int | None = None,
    subtype: int | None = None,
) -> bytes:
    """Encode a message by name (``vendor``/``subtype`` only for a generic ``CUSTOM_MESSAGE``)."""
    md = MESSAGES.get(name)
    if md is None:
        raise LlrpCodecError(f"unknown message {name!r}", StatusCode.M_UnsupportedMessage)
    out = bytearray()
    if md.type_num == TYPE_CUSTOM:
        v = md.vendor if vendor is None else vendor
        s = md.subtype if subtype is None else subtype
        _check_range("Subtype", s, 0, 0xFF)
        _check_range("VendorID", v, 0, 0xFFFFFFFF)
        out += CUSTOM_MSG_EXTRA.pack(v, s)
    _encode_body(md, params or {}, out, 0)
    _check_range("MessageID", msg_id, 0, 0xFFFFFFFF)
    _check_range("Version", version, 0, 7)
    return HEADER.pack((version << 10) | md.type_num, HEADER_LEN + len(out), msg_id) + bytes(out)


def encode_param(name: str, value: Any) -> bytes:
    """Encode a single parameter by name (useful for tests and hand-built frames)."""
    out = bytearray()
    _encode_param(PARAMS[name], value, out, 0)
    return bytes(out)


def decode_params(data: bytes, parent: str = "") -> dict[str, Any]:
    """Decode a run of parameters as if they were the children of ``parent`` (default: any)."""
    pd = PARAMS.get(parent) or ParamDef("", 0, children=tuple((n, True) for n in PARAMS))
    out: dict[str, Any] = {}
    _decode_children(pd, data, 0, len(data), out, 0)
    return out


# ---------------------------------------------------------------------------------------------
# Decoding internals
# ---------------------------------------------------------------------------------------------


def _decode_body(pd: ParamDef, buf: bytes, pos: int, end: int, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pos = _decode_fields(pd, buf, pos, end, out)
    _decode_children(pd, buf, pos, end, out, depth)
    return out


def _need(pd: ParamDef, pos: int, n: int, end: int) -> None:
    if pos + n > end:
        status = StatusCode.M_FieldError if pd.is_message else StatusCode.P_FieldError
        raise LlrpCodecError(f"{pd.name}: truncated field", status, pd.type_num)


def _decode_fields(pd: ParamDef, buf: bytes, pos: int, end: int, out: dict[str, Any]) -> int:
    acc = 0
    nbits = 0
    for fd in pd.fields:
        if fd.kind in ("bits", "rsv"):
            while nbits < fd.bits:
                _need(pd, pos, 1, end)
                acc = (acc << 8) | buf[pos]
                pos += 1
                nbits += 8
            nbits -= fd.bits
            value = (acc >> nbits) & ((1 << fd.bits) - 1)
            acc &= (1 << nbits) - 1
            if fd.kind == "bits":
                out[fd.name] = bool(value) if fd.bits == 1 else value
            continue
        if fd.kind in _INT_KINDS:
            st = _INT_KINDS[fd.kind]
            _need(pd, pos, st.size, end)
            out[fd.name] = st.unpack_from(buf, pos)[0]
            pos += st.size
        elif fd.kind == "u96":
            _need(pd, pos, 12, end)
            out[fd.name] = bytes(buf[pos : pos + 12])
            pos += 12
        elif fd.kind in _VEC_KINDS:
            _need(pd, pos, 2, end)
            (count,) = struct.unpack_from("!H", buf, pos)
            pos += 2
            st = _VEC_KINDS[fd.kind]
            _need(pd, pos, count * st.size, end)
            if fd.kind == "u8v":
                out[fd.name] = bytes(buf[pos : pos + count])
            else:
                out[fd.name] = [st.unpack_from(buf, pos + i * st.size)[0] for i in range(count)]
            pos += count * st.size
        elif fd.kind == "u1v":
            _need(pd, pos, 2, end)
            (count,) = struct.unpack_from("!H", buf, pos)
            pos += 2
            nbytes = (count + 7) // 8
            _need(pd, pos, nbytes, end)
            out[fd.name] = Bits(count, bytes(buf[pos : pos + nbytes]))
            pos += nbytes
        elif fd.kind == "utf8v":
            _need(pd, pos, 2, end)
            (count,) = struct.unpack_from("!H", buf, pos)
            pos += 2
            _need(pd, pos, count, end)
            try:
                out[fd.name] = bytes(buf[pos : pos + count]).decode("utf-8")
            except UnicodeDecodeError as err:
                raise LlrpCodecError(
                    f"{pd.name}.{fd.name}: invalid UTF-8", StatusCode.P_FieldError, pd.type_num
                ) from err
            pos += count
        elif fd.kind == "bytes":
            out[fd.name] = bytes(buf[pos:end])
            pos = end
        else:  # pragma: no cover - schema error
            raise AssertionError(fd.kind)
    return pos


def _decode_children(
    pd: ParamDef, buf: bytes, pos: int, end: int, out: dict[str, Any], depth: int
) -> None:
    if depth > MAX_DEPTH:
        raise LlrpCodecError("parameters nested too deeply", StatusCode.M_OverflowParameter)
    allowed = dict(pd.children)
    while pos < end:
        first = buf[pos]
        if first & 0x80:
            child = _PARAM_BY_TYPE.get((first & 0x7F, 0, 0))
            if child is None or not child.tv:
                raise LlrpCodecError(
                    f"{pd.name}: unknown TV parameter type {first & 0x7F}",
                    StatusCode.P_UnknownParameter,
                    first & 0x7F,
                )
            plen = child.tv_len
            if pos + plen > end:
                raise LlrpCodecError(
                    f"{child.name}: truncated", StatusCode.P_FieldError, child.type_num
                )
            tv_fields: dict[str, Any] = {}
            _decode_fields(child, buf, pos + 1, pos + plen, tv_fields)
            value: Any = tv_fields[child.fields[0].name] if child.scalar else tv_fields
            key = child.name
        else:
            if pos + 4 > end:
                raise LlrpCodecError(
                    f"{pd.name}: truncated parameter header", StatusCode.P_FieldError
                )
            word, plen = struct.unpack_from("!HH", buf, pos)
            ptype = word & 0x3FF
            if plen < 4 or pos + plen > end:
                raise LlrpCodecError(
                    f"{pd.name}: parameter type {ptype} length {plen} overruns its parent",
                    StatusCode.P_FieldError,
                    ptype,
                )
            if ptype == TYPE_CUSTOM:
                if plen < 12:
                    raise LlrpCodecError(
                        "custom parameter too short", StatusCode.P_FieldError, ptype
                    )
                vendor, subtype = struct.unpack_from("!II", buf, pos + 4)
                child = _PARAM_BY_TYPE.get((TYPE_CUSTOM, vendor, subtype))
                if child is None:
                    out.setdefault("Custom", []).append(
                        {
                            "VendorID": vendor,
                            "Subtype": subtype,
                            "Data": bytes(buf[pos + 12 : pos + plen]),
                        }
                    )
                    pos += plen
                    continue
                value = _decode_body(child, buf, pos + 12, pos + plen, depth + 1)
                key = child.name
            else:
                child = _PARAM_BY_TYPE.get((ptype, 0, 0))
                if child is None or child.tv:
                    raise LlrpCodecError(
                        f"{pd.name}: unknown parameter type {ptype}",
                        StatusCode.P_UnknownParameter,
                        ptype,
                    )
                value = _decode_body(child, buf, pos + 4, pos + plen, depth + 1)
                key = child.name
        if child.vendor == 0 and key not in allowed:
            raise LlrpCodecError(
                f"{key} is not allowed in {pd.name or 'this message'}",
                StatusCode.P_UnexpectedParameter,
                child.type_num,
            )
        if allowed.get(key, False):
            out.setdefault(key, []).append(value)
        elif key in out:
            raise LlrpCodecError(
                f"{pd.name}: duplicate {key}", StatusCode.P_DuplicateParameter, child.type_num
            )
        else:
            out[key] = value
        pos += plen


# ---------------------------------------------------------------------------------------------
# Encoding internals
# ---------------------------------------------------------------------------------------------


def _check_range(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LlrpCodecError(f"{name}={value!r} outside [{lo}, {hi}]", StatusCode.P_FieldError)


_INT_RANGES = {
    "u8": (0, 0xFF),
    "u16": (0, 0xFFFF),
    "u32": (0, 0xFFFFFFFF),
    "u64": (0, (1 << 64) - 1),
    "s8": (-128, 127),
    "s16": (-32768, 32767),
}


def _encode_fields(pd: ParamDef, value: Mapping[str, Any], out: bytearray) -> None:
    acc = 0
    nbits = 0
    for fd in pd.fields:
        if fd.kind in ("bits", "rsv"):
            v = 0
            if fd.kind == "bits":
                raw = value.get(fd.name, 0)
                v = int(raw) if isinstance(raw, bool) else raw
                _check_range(f"{pd.name}.{fd.name}", v, 0, (1 << fd.bits) - 1)
            acc = (acc << fd.bits) | v
            nbits += fd.bits
            while nbits >= 8:
                nbits -= 8
                out.append((acc >> nbits) & 0xFF)
                acc &= (1 << nbits) - 1
            continue
        if nbits:  # pragma: no cover - schema error
            raise AssertionError(f"{pd.name}: bit fields not byte aligned")
        raw = value.get(fd.name)
        where = f"{pd.name}.{fd.name}"
        if fd.kind in _INT_KINDS:
            lo, hi = _INT_RANGES[fd.kind]
            v = 0 if raw is None else raw
            _check_range(where, v, lo, hi)
            out += _INT_KINDS[fd.kind].pack(v)
        elif fd.kind == "u96":
            data = _as_bytes(where, raw if raw is not None else bytes(12))
            if len(data) != 12:
                raise LlrpCodecError(f"{where} must be 12 bytes", StatusCode.P_FieldError)
            out += data
        elif fd.kind == "u8v":
            data = _as_bytes(where, raw if raw is not None else b"")
            _check_range(f"{where} length", len(data), 0, 0xFFFF)
            out += struct.pack("!H", len(data)) + data
        elif fd.kind in ("u16v", "u32v"):
            items = list(raw or [])
            _check_range(f"{where} length", len(items), 0, 0xFFFF)
            lo, hi = _INT_RANGES["u16" if fd.kind == "u16v" else "u32"]
            out += struct.pack("!H", len(items))
            st = _VEC_KINDS[fd.kind]
            for item in items:
                _check_range(where, item, lo, hi)
                out += st.pack(item)
        elif fd.kind == "u1v":
            if isinstance(raw, Bits):
                bits = raw
            else:
                data = _as_bytes(where, raw if raw is not None else b"")
                bits = Bits(len(data) * 8, data)
            out += struct.pack("!H", bits.count) + bits.data
        elif fd.kind == "utf8v":
            data = str(raw or "").encode("utf-8")
            _check_range(f"{where} length", len(data), 0, 0xFFFF)
            out += struct.pack("!H", len(data)) + data
        elif fd.kind == "bytes":
            out += _as_bytes(where, raw if raw is not None else b"")
        else:  # pragma: no cover - schema error
            raise AssertionError(fd.kind)
    if nbits:  # pragma: no cover - schema error
        raise AssertionError(f"{pd.name}: bit fields not byte aligned")


def _as_bytes(where: str, raw: Any) -> bytes:
    if isinstance(raw, bytes | bytearray):
        return bytes(raw)
    if isinstance(raw, str):
        try:
            return bytes.fromhex(raw)
        except ValueError as err:
            raise LlrpCodecError(f"{where}: not hex", StatusCode.P_FieldError) from err
    raise LlrpCodecError(
        f"{where}: expected bytes, got {type(raw).__name__}", StatusCode.P_FieldError
    )


def _encode_body(pd: ParamDef, value: Mapping[str, Any], out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LlrpCodecError("parameters nested too deeply", StatusCode.M_OverflowParameter)
    if not isinstance(value, Mapping):
        raise LlrpCodecError(f"{pd.name}: expected a mapping", StatusCode.P_FieldError)
    _encode_fields(pd, value, out)
    field_names = {fd.name for fd in pd.fields}
    known = {name for name, _ in pd.children}
    for name, repeat in pd.children:
        if name in value and value[name] is not None:
            items = value[name] if repeat else [value[name]]
            if repeat and not isinstance(items, list | tuple):
                raise LlrpCodecError(f"{pd.name}.{name} must be a list", StatusCode.P_FieldError)
            for item in items:
                _encode_param(PARAMS[name], item, out, depth + 1)
    # Vendor parameters the schema knows, given by name, go after the standard ones.
    for key, item in value.items():
        if key in field_names or key in known or key == "Custom":
            continue
        child = PARAMS.get(key)
        if child is None or child.vendor == 0:
            raise LlrpCodecError(
                f"{key} is not allowed in {pd.name}", StatusCode.P_UnexpectedParameter
            )
        for one in item if isinstance(item, list) else [item]:
            _encode_param(child, one, out, depth + 1)
    for custom in value.get("Custom") or []:
        data = _as_bytes("Custom.Data", custom.get("Data", b""))
        _check_range("Custom.VendorID", custom["VendorID"], 0, 0xFFFFFFFF)
        _check_range("Custom.Subtype", custom["Subtype"], 0, 0xFFFFFFFF)
        _check_range("Custom length", 12 + len(data), 12, 0xFFFF)
        out += struct.pack(
            "!HHII", TYPE_CUSTOM, 12 + len(data), custom["VendorID"], custom["Subtype"]
        )
        out += data


def _encode_param(pd: ParamDef, value: Any, out: bytearray, depth: int) -> None:
    if pd.tv:
        out.append(0x80 | pd.type_num)
        _encode_fields(pd, {pd.fields[0].name: value} if pd.scalar else value, out)
        return
    start = len(out)
    header = 12 if pd.type_num == TYPE_CUSTOM else 4
    out += bytes(header)
    _encode_body(pd, value if value is not None else {}, out, depth)
    length = len(out) - start
    if length > 0xFFFF:
        raise LlrpCodecError(f"{pd.name} longer than 65535 bytes", StatusCode.P_OverflowParameter)
    struct.pack_into("!HH", out, start, pd.type_num, length)
    if header == 12:
        struct.pack_into("!II", out, start + 4, pd.vendor, pd.subtype)


def epc_hex(tag_report: Mapping[str, Any]) -> str:
    """The EPC of a decoded TagReportData as lower-case hex (EPC_96 or EPCData)."""
    if "EPC_96" in tag_report:
        return bytes(tag_report["EPC_96"]).hex()
    bits: Bits = tag_report["EPCData"]["EPC"]
    return bits.data.hex()
