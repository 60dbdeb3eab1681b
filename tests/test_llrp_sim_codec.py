"""The LLRP simulator's own codec: property round trips, hostile bytes, real R420 captures, sllurp."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sllurp.llrp import LLRPMessage
from sllurp.llrp_proto import LLRPROSpec

from simulators.llrp.codec import (
    HEADER,
    MESSAGES,
    PARAMS,
    TYPE_CUSTOM,
    Bits,
    FieldDef,
    FrameReader,
    FramingError,
    LlrpCodecError,
    ParamDef,
    StatusCode,
    decode_frame,
    decode_message,
    decode_params,
    encode_message,
    encode_param,
    epc_hex,
)
from tests.conftest import CAPTURES

# LLRP_SIM_EXAMPLES=3000 for a deeper local run.
PROPS = settings(
    max_examples=int(os.environ.get("LLRP_SIM_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_INT = {
    "u8": (0, 0xFF),
    "u16": (0, 0xFFFF),
    "u32": (0, 0xFFFFFFFF),
    "u64": (0, (1 << 64) - 1),
    "s8": (-128, 127),
    "s16": (-32768, 32767),
}


def field_values(fd: FieldDef) -> st.SearchStrategy[Any]:
    if fd.kind == "bits":
        return st.booleans() if fd.bits == 1 else st.integers(0, (1 << fd.bits) - 1)
    if fd.kind in _INT:
        return st.integers(*_INT[fd.kind])
    if fd.kind == "u96":
        return st.binary(min_size=12, max_size=12)
    if fd.kind in ("u8v", "bytes"):
        return st.binary(max_size=24)
    if fd.kind == "u16v":
        return st.lists(st.integers(0, 0xFFFF), max_size=6)
    if fd.kind == "u32v":
        return st.lists(st.integers(0, 0xFFFFFFFF), max_size=6)
    if fd.kind == "u1v":
        return st.integers(0, 80).flatmap(
            lambda n: st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8).map(
                lambda b: Bits(n, b)
            )
        )
    if fd.kind == "utf8v":
        return st.text(max_size=16)
    raise AssertionError(fd.kind)


def unknown_customs() -> st.SearchStrategy[list[dict[str, Any]]]:
    custom = st.fixed_dictionaries(
        {
            "VendorID": st.integers(1, 0xFFFFFFFF).filter(lambda v: v != 25882),
            "Subtype": st.integers(0, 0xFFFFFFFF),
            "Data": st.binary(max_size=16),
        }
    )
    return st.lists(custom, min_size=1, max_size=2)


def values(pd: ParamDef, depth: int = 0) -> st.SearchStrategy[Any]:
    """Any value the schema allows for ``pd`` (children pruned beyond a few levels)."""
    fields = {fd.name: field_values(fd) for fd in pd.fields if fd.kind != "rsv"}
    if pd.scalar:
        return fields[pd.fields[0].name]
    optional: dict[str, st.SearchStrategy[Any]] = {}
    if depth < 4:
        for name, repeat in pd.children:
            child = values(PARAMS[name], depth + 1)
            optional[name] = st.lists(child, min_size=1, max_size=2) if repeat else child
        if not pd.tv:
            optional["Custom"] = unknown_customs()
    return st.fixed_dictionaries(fields, optional=optional)


def messages() -> st.SearchStrategy[tuple[str, int, dict[str, Any]]]:
    names = sorted(n for n in MESSAGES if n != "CUSTOM_MESSAGE")
    return st.sampled_from(names).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, 0xFFFFFFFF), values(MESSAGES[n]))
    )


# --- property round trips ------------------------------------------------------------------------


@PROPS
@given(messages())
def test_every_message_round_trips(case: tuple[str, int, dict[str, Any]]) -> None:
    name, msg_id, params = case
    try:
        data = encode_message(name, params, msg_id)
    except LlrpCodecError as err:
        # Only a parameter over 64 KiB may legitimately fail to encode.
        status = err.status
        assert status == StatusCode.P_OverflowParameter
        return
    msg = decode_message(data)
    assert (msg.name, msg.msg_id) == (name, msg_id)
    assert msg.params == params
    assert encode_message(name, msg.params, msg_id) == data


@PROPS
@given(st.sampled_from(sorted(PARAMS)).flatmap(lambda n: st.tuples(st.just(n), values(PARAMS[n]))))
def test_every_parameter_round_trips(case: tuple[str, Any]) -> None:
    name, value = case
    data = encode_param(name, value)
    decoded = decode_params(data)
    got = decoded[name]
    assert got == [value]


@PROPS
@given(st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFF), st.binary(max_size=64))
def test_unknown_vendor_messages_keep_their_payload(vendor: int, subtype: int, data: bytes) -> None:
    raw = encode_message("CUSTOM_MESSAGE", {"Data": data}, 9, vendor=vendor, subtype=subtype)
    msg = decode_message(raw)
    if (vendor, subtype) in ((25882, 21), (25882, 22)):
        assert msg.name.startswith("IMPINJ_ENABLE_EXTENSIONS")
    else:
        assert (msg.name, msg.vendor, msg.subtype, msg.params) == (
            "CUSTOM_MESSAGE",
            vendor,
            subtype,
            {"Data": data},
        )


# --- hostile input -------------------------------------------------------------------------------


@PROPS
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_escape_as_anything_but_codec_errors(chunks: list[bytes]) -> None:
    reader = FrameReader(max_message_len=4096)
    for chunk in chunks:
        try:
            frames = reader.feed(chunk)
        except FramingError:
            reader = FrameReader(max_message_len=4096)
            continue
        assert reader.buffered < 4096
        for frame in frames:
            with contextlib.suppress(LlrpCodecError):
                decode_frame(frame)


@PROPS
@given(messages(), st.data())
def test_corrupted_messages_fail_cleanly(
    case: tuple[str, int, dict[str, Any]], data: st.DataObject
) -> None:
    name, msg_id, params = case
    try:
        raw = bytearray(encode_message(name, params, msg_id))
    except LlrpCodecError:
        return
    if len(raw) <= 10:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(10, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(10, len(raw)))
    body = bytes(raw[10:cut])
    frame_bytes = HEADER.pack(int.from_bytes(raw[:2], "big"), 10 + len(body), msg_id) + body
    status = StatusCode.M_Success
    try:
        decode_message(frame_bytes)
    except LlrpCodecError as err:
        status = err.status
        assert status != StatusCode.M_Success


def test_framer_bounds_lengths() -> None:
    reader = FrameReader(max_message_len=64)
    with pytest.raises(FramingError):
        reader.feed(HEADER.pack((1 << 10) | 1, 65, 1))
    assert reader.buffered == 0
    with pytest.raises(FramingError):
        FrameReader().feed(HEADER.pack((1 << 10) | 1, 9, 1))
    # Split anywhere, frames come out whole.
    one = encode_message("GET_READER_CAPABILITIES", {"RequestedData": 3}, 5)
    two = encode_message("KEEPALIVE", {}, 6)
    stream = one + two
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        frames = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [f.raw for f in frames] == [one, two]


def test_parameters_that_overrun_their_parent_are_rejected() -> None:
    # A TagReportData claiming 40 bytes inside a 4-byte report body.
    body = bytes([0x00, 240, 0x00, 40])
    with pytest.raises(LlrpCodecError, match="overruns"):
        decode_message(HEADER.pack((1 << 10) | 61, 10 + len(body), 1) + body)
    # A known parameter where it does not belong.
    ka = encode_param("KeepaliveSpec", {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 5})
    with pytest.raises(LlrpCodecError, match="not allowed") as info:
        decode_message(HEADER.pack((1 << 10) | 61, 10 + len(ka), 1) + ka)
    assert info.value.status == StatusCode.P_UnexpectedParameter
    # Encoding refuses out-of-range values instead of truncating them.
    with pytest.raises(LlrpCodecError, match="outside"):
        encode_message("DELETE_ROSPEC", {"ROSpecID": -1})


# --- real reader captures (Impinj Speedway R420, EdgeX test data) --------------------------------

CAPTURE_TYPES = {
    "ROAccessReport": 61,
    "GetReaderCapabilitiesResponse": 11,
    "GetReaderConfigResponse": 12,
    "ReaderEventNotification": 63,
    "CloseConnectionResponse": 4,
    "GetROSpecsResponse": 36,
    "GetAccessSpecsResponse": 54,
}


def capture(name: str) -> tuple[bytes, dict[str, Any]]:
    stem = CAPTURES / name
    body = Path(f"{stem}.bytes").read_bytes()
    expected = json.loads(Path(f"{stem}.json").read_text())
    raw = HEADER.pack((1 << 10) | CAPTURE_TYPES[name.split("-")[0]], 10 + len(body), 42) + body
    return raw, expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_captured_ro_access_reports(n: int) -> None:
    raw, expected = capture(f"ROAccessReport-00{n}")
    msg = decode_message(raw)
    assert msg.name == "RO_ACCESS_REPORT"
    (tag,) = msg.params["TagReportData"]
    (want,) = expected["TagReportData"]
    assert tag["EPC_96"] == base64.b64decode(want["EPC96"]["EPC"])
    assert tag["AntennaID"] == want["AntennaID"]
    assert tag["PeakRSSI"] == want["PeakRSSI"]
    assert tag["FirstSeenTimestampUTC"] == want["FirstSeenUTC"]
    assert set(tag) == {"EPC_96", "AntennaID", "PeakRSSI", "FirstSeenTimestampUTC"}
    assert encode_message("RO_ACCESS_REPORT", msg.params, 42) == raw


def test_captured_capabilities() -> None:
    raw, want = capture("GetReaderCapabilitiesResponse-000")
    msg = decode_message(raw)
    p = msg.params
    assert p["LLRPStatus"] == {"StatusCode": 0, "ErrorDescription": ""}
    gdc, wgdc = p["GeneralDeviceCapabilities"], want["GeneralDeviceCapabilities"]
    assert gdc["MaxNumberOfAntennaSupported"] == wgdc["MaxSupportedAntennas"]
    assert gdc["HasUTCClockCapability"] == wgdc["HasUTCClock"]
    assert gdc["CanSetAntennaProperties"] == wgdc["CanSetAntennaProperties"]
    assert gdc["DeviceManufacturerName"] == wgdc["DeviceManufacturer"]
    assert gdc["ModelName"] == wgdc["Model"]
    assert gdc["ReaderFirmwareVersion"] == wgdc["FirmwareVersion"]
    assert gdc["GPIOCapabilities"] == wgdc["GPIOCapabilities"]
    assert [
        (e["Index"], e["ReceiveSensitivityValue"]) for e in gdc["ReceiveSensitivityTableEntry"]
    ] == [(e["Index"], e["ReceiveSensitivity"]) for e in wgdc["ReceiveSensitivities"]]
    assert [(a["AntennaID"], a["ProtocolID"]) for a in gdc["PerAntennaAirProtocol"]] == [
        (a["AntennaID"], base64.b64decode(a["AirProtocolIDs"]))
        for a in wgdc["PerAntennaAirProtocols"]
    ]
    caps, wcaps = p["LLRPCapabilities"], want["LLRPCapabilities"]
    assert caps["MaxNumROSpecs"] == wcaps["MaxROSpecs"]
    assert caps["MaxNumAccessSpecs"] == wcaps["MaxAccessSpecs"]
    assert caps["SupportsEventAndReportHolding"] == wcaps["SupportsEventsAndReportHolding"]
    reg, wreg = p["RegulatoryCapabilities"], want["RegulatoryCapabilities"]
    assert (reg["CountryCode"], reg["CommunicationsStandard"]) == (
        wreg["CountryCode"],
        wreg["CommunicationsStandard"],
    )
    band, wband = reg["UHFBandCapabilities"], wreg["UHFBandCapabilities"]
    assert [
        (e["Index"], e["TransmitPowerValue"]) for e in band["TransmitPowerLevelTableEntry"]
    ] == [(e["Index"], e["TransmitPowerValue"]) for e in wband["TransmitPowerLevels"]]
    hop = band["FrequencyInformation"]["FrequencyHopTable"][0]
    whop = wband["FrequencyInformation"]["FrequencyHopTables"][0]
    assert (hop["HopTableID"], hop["Frequency"]) == (whop["HopTableID"], whop["Frequencies"])
    modes = band["UHFC1G2RFModeTable"]["UHFC1G2RFModeTableEntry"]
    wmodes = wband["C1G2RFModes"]["UHFC1G2RFModeTableEntries"]
    assert [
        (
            m["ModeIdentifier"],
            int(m["DRValue"]),
            m["MValue"],
            m["ForwardLinkModulation"],
            m["SpectralMaskIndicator"],
            m["BDRValue"],
            m["PIEValue"],
            m["MinTariValue"],
            m["MaxTariValue"],
            m["StepTariValue"],
        )
        for m in modes
    ] == [
        (
            m["ModeID"],
            m["DivideRatio"],
            m["Modulation"],
            m["ForwardLinkModulation"],
            m["SpectralMask"],
            m["BackscatterDataRate"],
            m["PIERatio"],
            m["MinTariTime"],
            m["MaxTariTime"],
            m["StepTariTime"],
        )
        for m in wmodes
    ]
    c1g2, wc1g2 = p["C1G2LLRPCapabilities"], want["C1G2LLRPCapabilities"]
    assert c1g2["CanSupportBlockWrite"] == wc1g2["SupportsBlockWrite"]
    assert c1g2["MaxNumSelectFiltersPerQuery"] == wc1g2["MaxSelectFiltersPerQuery"]
    assert encode_message(msg.name, p, 42) == raw


def test_simulated_impinj_capabilities_match_the_real_r420_where_modelled() -> None:
    from simulators.llrp.personality import IMPINJ

    raw, _ = capture("GetReaderCapabilitiesResponse-000")
    real = decode_message(raw).params
    ours = IMPINJ.capabilities(4)
    for key in (
        "MaxNumberOfAntennaSupported",
        "DeviceManufacturerName",
        "ModelName",
        "HasUTCClockCapability",
        "GPIOCapabilities",
        "ReceiveSensitivityTableEntry",
    ):
        assert ours["GeneralDeviceCapabilities"][key] == real["GeneralDeviceCapabilities"][key]
    assert ours["LLRPCapabilities"]["MaxNumROSpecs"] == real["LLRPCapabilities"]["MaxNumROSpecs"]
    band = ours["RegulatoryCapabilities"]["UHFBandCapabilities"]
    real_band = real["RegulatoryCapabilities"]["UHFBandCapabilities"]
    assert band["TransmitPowerLevelTableEntry"] == real_band["TransmitPowerLevelTableEntry"]
    real_modes = {
        m["ModeIdentifier"]: m for m in real_band["UHFC1G2RFModeTable"]["UHFC1G2RFModeTableEntry"]
    }
    for mode in band["UHFC1G2RFModeTable"]["UHFC1G2RFModeTableEntry"]:
        assert mode == real_modes[mode["ModeIdentifier"]]


@pytest.mark.parametrize(
    "name",
    [
        "GetReaderConfigResponse-000",
        "ReaderEventNotification-000",
        "CloseConnectionResponse-000",
        "GetROSpecsResponse-000",
        "GetAccessSpecsResponse-000",
    ],
)
def test_other_captures_decode_and_reencode_identically(name: str) -> None:
    raw, want = capture(name)
    msg = decode_message(raw)
    assert encode_message(msg.name, msg.params, 42) == raw
    if name.startswith("ReaderEvent"):
        data = msg.params["ReaderEventNotificationData"]
        assert (
            data["UTCTimestamp"]["Microseconds"]
            == want["ReaderEventNotificationData"]["UTCTimestamp"]
        )
        assert data["ConnectionCloseEvent"] == {}
    if name.startswith("GetReaderConfig"):
        p = msg.params
        assert p["Identification"]["ReaderID"] == base64.b64decode(
            want["Identification"]["ReaderID"]
        )
        assert [a["AntennaConnected"] for a in p["AntennaProperties"]] == [
            a["AntennaConnected"] for a in want["AntennaProperties"]
        ]
        assert [c["RFTransmitter"]["TransmitPower"] for c in p["AntennaConfiguration"]] == [
            c["RFTransmitter"]["TransmitPowerIndex"] for c in want["AntennaConfigurations"]
        ]


# --- what sllurp sends decodes in ours -----------------------------------------------------------


def test_sllurp_requests_decode() -> None:
    mode = {"ModeIdentifier": 1000, "MaxTari": 6250}
    spec = LLRPROSpec(
        mode,
        1,
        antennas=[1, 2],
        tx_power={1: 81, 2: 60},
        report_every_n_tags=5,
        impinj_search_mode=2,
        impinj_tag_content_selector={
            "EnableRFPhaseAngle": True,
            "EnablePeakRSSI": True,
            "EnableRFDopplerFrequency": False,
        },
        tag_filter_mask=["3008"],
    )
    raw = LLRPMessage(msgdict={"ADD_ROSPEC": {"ROSpecID": 1, "ROSpec": spec, "ID": 3}}).msgbytes
    msg = decode_message(raw)
    ro = msg.params["ROSpec"]
    assert (msg.name, msg.msg_id, ro["ROSpecID"]) == ("ADD_ROSPEC", 3, 1)
    ai = ro["AISpec"][0]
    assert ai["AntennaIDs"] == [1, 2]
    assert ai["AISpecStopTrigger"]["TagObservationTrigger"]["NumberOfTags"] == 5
    configs = ai["InventoryParameterSpec"][0]["AntennaConfiguration"]
    assert [c["RFTransmitter"]["TransmitPower"] for c in configs] == [81, 60]
    cmd = configs[0]["C1G2InventoryCommand"][0]
    assert cmd["ImpinjInventorySearchMode"] == {"InventorySearchMode": 2}
    assert cmd["C1G2Filter"][0]["C1G2TagInventoryMask"]["TagMask"] == Bits.from_hex("3008")
    sel = ro["ROReportSpec"]["ImpinjTagReportContentSelector"]
    assert sel["ImpinjEnablePeakRSSI"] == {"PeakRSSIMode": 1}
    ext = decode_message(LLRPMessage(msgdict={"IMPINJ_ENABLE_EXTENSIONS": {"ID": 4}}).msgbytes)
    assert (ext.name, ext.vendor, ext.subtype) == ("IMPINJ_ENABLE_EXTENSIONS", 25882, 21)


def test_epc_hex_and_bits() -> None:
    assert epc_hex({"EPC_96": bytes.fromhex("3008" + "00" * 10)}) == "3008" + "00" * 10
    assert epc_hex({"EPCData": {"EPC": Bits.from_hex("e280")}}) == "e280"
    with pytest.raises(ValueError, match="bits"):
        Bits(9, b"\x00")
    assert TYPE_CUSTOM == 1023
