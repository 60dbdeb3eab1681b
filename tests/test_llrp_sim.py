"""LLRP reader simulator over real sockets: protocol behaviour, reports, GPIO, sllurp sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from sllurp.llrp import LLRPClient, LLRPMessage, LLRPReaderConfig, LLRPReaderState

from simulators.llrp import LlrpSimulator, SimTag, StatusCode
from simulators.llrp.codec import HEADER, encode_message, epc_hex
from tests.llrp_sim_client import RawClient, rospec, sllurp_decode, status

EPC1 = "300833b2ddd9014000000001"
EPC2 = "300833b2ddd9014000000002"
EPC3 = "300833b2ddd9014000000003"


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[LlrpSimulator]:
    async with LlrpSimulator(personality="impinj", antennas=4, cycle_s=0.02, seed=1) as s:
        yield s


async def connected(sim: LlrpSimulator) -> RawClient:
    client = await RawClient.connect(sim.host, sim.port)
    greeting = await client.expect("READER_EVENT_NOTIFICATION")
    assert greeting.params["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"] == 0
    return client


async def start_rospec(client: RawClient, spec: dict[str, Any]) -> None:
    assert status(await client.request("ADD_ROSPEC", {"ROSpec": spec})) == 0
    assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": spec["ROSpecID"]})) == 0


async def reports(client: RawClient, count: int) -> list[list[dict[str, Any]]]:
    got = []
    for _ in range(count):
        msg = await client.expect("RO_ACCESS_REPORT")
        got.append(msg.params["TagReportData"])
    return got


# --- connection, capabilities, config ----------------------------------------------------------


async def test_greeting_and_capabilities_are_what_sllurp_expects(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        name, greeting = client.sllurp[0]
        assert name == "READER_EVENT_NOTIFICATION"
        assert (
            greeting["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"] == "Success"
        )
        assert greeting["ReaderEventNotificationData"]["UTCTimestamp"]["Microseconds"] > 0

        caps = await client.request("GET_READER_CAPABILITIES", {"RequestedData": 0})
        assert status(caps) == 0
        name, decoded = client.sllurp[-1]
        assert name == "GET_READER_CAPABILITIES_RESPONSE"
        gdc = decoded["GeneralDeviceCapabilities"]
        assert gdc["MaxNumberOfAntennaSupported"] == 4
        assert gdc["DeviceManufacturerName"] == 25882
        assert gdc["ModelName"] == 2001002
        assert gdc["GPIOCapabilities"] == {"NumGPIs": 4, "NumGPOs": 4}
        # sllurp's own capability parser accepts it and finds 81 power levels and mode 1000.
        llrp = LLRPClient(LLRPReaderConfig({"antennas": [1, 2, 3, 4], "mode_identifier": 1000}))
        llrp.parseCapabilities(decoded)
        assert llrp.max_ant == 4
        assert len(llrp.tx_power_table) == 82
        assert llrp.tx_power_table[1] == 10.0
        assert llrp.tx_power_table[81] == 30.0
        assert llrp.reader_mode["ModeIdentifier"] == 1000


async def test_zebra_personality_and_unsupported_impinj_extension() -> None:
    async with (
        LlrpSimulator(personality="zebra", cycle_s=0.02, seed=2) as sim,
        await connected(sim) as client,
    ):
        caps = await client.request("GET_READER_CAPABILITIES", {"RequestedData": 0})
        gdc = caps.params["GeneralDeviceCapabilities"]
        assert gdc["DeviceManufacturerName"] == 10642
        assert gdc["MaxNumberOfAntennaSupported"] == 8
        levels = caps.params["RegulatoryCapabilities"]["UHFBandCapabilities"][
            "TransmitPowerLevelTableEntry"
        ]
        assert levels[0]["TransmitPowerValue"] == 1000
        assert levels[-1]["TransmitPowerValue"] == 3150
        err = await client.request("IMPINJ_ENABLE_EXTENSIONS")
        assert err.name == "ERROR_MESSAGE"
        assert status(err) == StatusCode.M_UnsupportedMessage
        assert client.sllurp[-1][1]["LLRPStatus"]["StatusCode"] == "UnsupportedMessage"


async def test_impinj_enable_extensions(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        resp = await client.request("IMPINJ_ENABLE_EXTENSIONS")
        assert resp.name == "IMPINJ_ENABLE_EXTENSIONS_RESPONSE"
        assert (resp.vendor, resp.subtype) == (25882, 22)
        assert status(resp) == 0
        assert LLRPMessage(msgbytes=client.frames[-1]).isSuccess()


async def test_set_then_get_reader_config(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        resp = await client.request(
            "SET_READER_CONFIG",
            {
                "ReaderEventNotificationSpec": {
                    "EventNotificationState": [{"EventType": 1, "NotificationState": True}]
                },
                "KeepaliveSpec": {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 60000},
                "GPIPortCurrentState": [{"GPIPortNum": 2, "Config": True, "State": 0}],
                "GPOWriteData": [{"GPOPortNumber": 3, "GPOData": True}],
            },
        )
        assert status(resp) == 0
        cfg = await client.request("GET_READER_CONFIG", {"RequestedData": 0})
        p = cfg.params
        assert p["KeepaliveSpec"] == {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 60000}
        states = {
            s["EventType"]: s["NotificationState"]
            for s in p["ReaderEventNotificationSpec"]["EventNotificationState"]
        }
        assert states[1] is True
        assert {g["GPIPortNum"]: g["Config"] for g in p["GPIPortCurrentState"]} == {
            1: False,
            2: True,
            3: False,
            4: False,
        }
        assert {g["GPOPortNumber"]: g["GPOData"] for g in p["GPOWriteData"]}[3] is True
        assert len(p["AntennaConfiguration"]) == 4
        name, decoded = client.sllurp[-1]
        assert name == "GET_READER_CONFIG_RESPONSE"
        assert decoded["KeepaliveSpec"]["TimeInterval"] == 60000
        assert len(decoded["GPIPortCurrentState"]) == 4
        # A single GPI port can be asked for.
        one = await client.request("GET_READER_CONFIG", {"RequestedData": 9, "GPIPortNum": 2})
        assert one.params["GPIPortCurrentState"] == [{"GPIPortNum": 2, "Config": True, "State": 0}]
        assert "KeepaliveSpec" not in one.params
        # A bad port in SET changes nothing and says why.
        bad = await client.request(
            "SET_READER_CONFIG",
            {
                "KeepaliveSpec": {"KeepaliveTriggerType": 0, "PeriodicTriggerValue": 0},
                "GPOWriteData": [{"GPOPortNumber": 9, "GPOData": True}],
            },
        )
        assert status(bad) == StatusCode.M_ParameterError
        assert "GPOPortNumber 9" in bad.params["LLRPStatus"]["ErrorDescription"]
        assert sim.config.keepalive_ms == 60000


async def test_keepalives_are_periodic_and_acks_counted(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        resp = await client.request(
            "SET_READER_CONFIG",
            {"KeepaliveSpec": {"KeepaliveTriggerType": 1, "PeriodicTriggerValue": 30}},
        )
        assert status(resp) == 0
        for _ in range(3):
            ka = await client.expect("KEEPALIVE")
            assert client.sllurp[-1][0] == "KEEPALIVE"
            client.send("KEEPALIVE_ACK", {}, ka.msg_id)
        await sim.wait_until(lambda: sim.stats.keepalive_acks >= 3)
        assert sim.stats.keepalives_sent >= 3
        assert sim.received_counts["KEEPALIVE_ACK"] == 3


async def test_close_connection(sim: LlrpSimulator) -> None:
    client = await connected(sim)
    resp = await client.request("CLOSE_CONNECTION")
    assert resp.name == "CLOSE_CONNECTION_RESPONSE"
    assert client.sllurp[-1][1]["LLRPStatus"]["StatusCode"] == "Success"
    assert await client.eof() == b""
    await client.close()
    await sim.wait_until(lambda: sim.connections.active == 0)
    # The reader takes the next client.
    async with await connected(sim):
        assert sim.connections.active == 1


async def test_unsupported_and_malformed_messages_get_errors(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        # An unknown message type.
        client.send_raw(HEADER.pack((1 << 10) | 500, 10, 77))
        err = await client.expect("ERROR_MESSAGE")
        assert err.msg_id == 77
        assert status(err) == StatusCode.M_UnsupportedMessage
        # A vendor message the reader does not know.
        client.send_raw(
            encode_message("CUSTOM_MESSAGE", {"Data": b"x"}, 81, vendor=4242, subtype=9)
        )
        err = await client.expect("ERROR_MESSAGE")
        assert (err.msg_id, status(err)) == (81, StatusCode.M_UnsupportedMessage)
        # Wrong protocol version.
        client.send_raw(HEADER.pack((2 << 10) | 62, 10, 78))
        err = await client.expect("ERROR_MESSAGE")
        assert (err.msg_id, status(err)) == (78, StatusCode.M_UnsupportedVersion)
        # A truncated ADD_ROSPEC body: the response carries the error, the session lives on.
        bad = HEADER.pack((1 << 10) | 20, 10 + 6, 79) + bytes([0, 177, 0, 40, 0, 0])
        client.send_raw(bad)
        resp = await client.expect("ADD_ROSPEC_RESPONSE")
        assert resp.msg_id == 79
        assert status(resp) != 0
        assert status(await client.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0
        # An impossible length cannot be resynchronised: error, then the reader hangs up.
        client.send_raw(HEADER.pack((1 << 10) | 1, 5, 80))
        err = await client.expect("ERROR_MESSAGE")
        assert status(err) != 0
        assert await client.eof() == b""
    assert sim.stats.decode_errors >= 4
    async with await connected(sim) as again:
        assert status(await again.request("GET_READER_CAPABILITIES", {"RequestedData": 2})) == 0


# --- ROSpecs and reports -------------------------------------------------------------------------


@pytest.mark.parametrize("personality", ["impinj", "zebra"])
async def test_sllurp_session_reaches_inventorying_and_reports_each_antenna(
    personality: str,
) -> None:
    impinj = personality == "impinj"
    options: dict[str, Any] = {
        "antennas": [1, 2, 3, 4],
        "report_every_n_tags": 2,
        "session": 0,
        # Not the table's top: sllurp 3.0.5's find_closest never picks the last entry.
        "tx_power_dbm": {1: 29.0, 2: 29.0, 3: 25.0, 4: 20.0},
        "tag_content_selector": {"EnableAntennaID": True, "EnablePeakRSSI": True},
    }
    if impinj:
        options["impinj_search_mode"] = 2
        options["impinj_tag_content_selector"] = {
            "EnableRFPhaseAngle": True,
            "EnablePeakRSSI": True,
            "EnableRFDopplerFrequency": False,
        }
    sim = LlrpSimulator(personality=personality, antennas=4, cycle_s=0.02, seed=4)
    sim.add_tag(SimTag(epc=EPC1, antenna=1, rssi_mean=-50.0, rssi_spread=0.0))
    sim.add_tag(SimTag(epc=EPC2, antenna=3, rssi_mean=-60.0))
    sim.add_tag(SimTag(epc=EPC3, antenna=4, rssi_mean=-65.0, also_at={2: -72.0}))
    async with sim:
        reader, writer = await asyncio.open_connection(sim.host, sim.port)
        client = LLRPClient(LLRPReaderConfig(options), transport_tx_write=writer.write)
        seen: dict[tuple[str, int], dict[str, Any]] = {}

        def on_frame(raw: bytes) -> None:
            msg = LLRPMessage(msgbytes=raw)
            if (
                msg.getName() == "RO_ACCESS_REPORT"
                and client.state == LLRPReaderState.STATE_INVENTORYING
            ):
                for tag in msg.msgdict["RO_ACCESS_REPORT"]["TagReportData"]:
                    seen[(tag["EPC-96"].decode(), tag["AntennaID"])] = tag
            client.handleMessage(msg)

        async def pump() -> None:
            buf = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 10 and len(buf) >= int.from_bytes(buf[2:6], "big"):
                    n = int.from_bytes(buf[2:6], "big")
                    on_frame(buf[:n])
                    buf = buf[n:]

        pump_task = asyncio.create_task(pump(), name="test-sllurp-pump")
        want = {(EPC1, 1), (EPC2, 3), (EPC3, 4), (EPC3, 2)}
        try:
            await sim.wait_until(
                lambda: client.state == LLRPReaderState.STATE_INVENTORYING and want <= set(seen),
                timeout=15,
            )
        finally:
            writer.close()
            await asyncio.wait_for(pump_task, 10)
    assert set(seen) == want
    # -50 dBm at full power; antenna 1 transmits at 29 dBm, below the top of the table.
    assert seen[(EPC1, 1)]["PeakRSSI"] == round(-50 + 29.0 - sim.personality.power_dbm[-1])
    assert sim.received_counts.get("IMPINJ_ENABLE_EXTENSIONS", 0) == int(impinj)
    assert sim.received_counts["ADD_ROSPEC"] == 1
    add = next(p for n, p in sim.received_messages if n == "ADD_ROSPEC")
    configs = add["ROSpec"]["AISpec"][0]["InventoryParameterSpec"][0]["AntennaConfiguration"]
    # sllurp turned the dBm it was asked for into indexes of this reader's power table.
    table = sim.personality.power_dbm
    assert [table[c["RFTransmitter"]["TransmitPower"] - 1] for c in configs] == [
        29.0,
        29.0,
        25.0,
        20.0,
    ]
    if impinj:
        cmd = configs[0]["C1G2InventoryCommand"][0]
        assert cmd["ImpinjInventorySearchMode"] == {"InventorySearchMode": 2}
        assert seen[(EPC1, 1)]["ImpinjPeakRSSI"] == seen[(EPC1, 1)]["PeakRSSI"] * 100
        assert 0 <= seen[(EPC1, 1)]["ImpinjRFPhaseAngle"] < 4096
    else:
        assert "ImpinjPeakRSSI" not in seen[(EPC1, 1)]


async def test_report_every_n_tags_is_honoured(sim: LlrpSimulator) -> None:
    for i in range(7):
        sim.add_tag(SimTag(epc=f"3008{i:020x}", antenna=1 + i % 4))
    async with await connected(sim) as client:
        await start_rospec(client, rospec(trigger=2, n=3))
        batches = await reports(client, 5)
        assert all(len(batch) == 3 for batch in batches)
        resp = await client.request("STOP_ROSPEC", {"ROSpecID": 1})
        assert status(resp) == 0
        # What was left over when the ROSpec ended came just before the response.
        names = [n for n, _ in client.sllurp]
        assert names[-1] == "STOP_ROSPEC_RESPONSE"
        tail = [d for n, d in client.sllurp[-3:-1] if n == "RO_ACCESS_REPORT"]
        assert all(len(d["TagReportData"]) <= 3 for d in tail)
        # Stopped means stopped: no inventory task is left to produce anything.
        assert sim.rospecs[1].state == 1
        task = sim.rospecs[1].task
        assert task is not None
        assert task.done()


@pytest.mark.parametrize(
    ("selector", "memory", "expected"),
    [
        (
            {"EnableAntennaID": True, "EnablePeakRSSI": False, "EnableFirstSeenTimestamp": False},
            {},
            {"EPC_96", "AntennaID"},
        ),
        (
            {"EnablePeakRSSI": False, "EnableFirstSeenTimestamp": False, "EnableAntennaID": False},
            {"EnablePCBits": True},
            {"EPC_96", "TagSeenCount", "C1G2_PC"},
        ),
        (
            {
                "EnableROSpecID": True,
                "EnableSpecIndex": True,
                "EnableInventoryParameterSpecID": True,
                "EnableChannelIndex": True,
                "EnableLastSeenTimestamp": True,
                "EnableAccessSpecID": True,
            },
            {"EnableCRC": True, "EnablePCBits": True},
            {
                "EPC_96",
                "ROSpecID",
                "SpecIndex",
                "InventoryParameterSpecID",
                "AntennaID",
                "PeakRSSI",
                "ChannelIndex",
                "FirstSeenTimestampUTC",
                "LastSeenTimestampUTC",
                "TagSeenCount",
                "C1G2_PC",
                "C1G2_CRC",
                "AccessSpecID",
            },
        ),
    ],
)
async def test_content_selector_is_honoured(
    sim: LlrpSimulator, selector: dict[str, bool], memory: dict[str, bool], expected: set[str]
) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=2, rssi_mean=-58.0, rssi_spread=0.0))
    base = (
        {"EnableTagSeenCount": True}
        if "TagSeenCount" in expected
        else {"EnableTagSeenCount": False}
    )
    spec = rospec(trigger=1, n=1, selector={**base, **selector})
    spec["ROReportSpec"]["TagReportContentSelector"]["C1G2EPCMemorySelector"] = [
        {"EnableCRC": False, "EnablePCBits": False, **memory}
    ]
    async with await connected(sim) as client:
        await start_rospec(client, spec)
        (batch,) = await reports(client, 1)
        assert set(batch[0]) == expected
        assert epc_hex(batch[0]) == EPC1
        if "AntennaID" in expected:
            assert batch[0]["AntennaID"] == 2
        if "PeakRSSI" in expected:
            assert batch[0]["PeakRSSI"] == -58
        if "C1G2_PC" in expected:
            assert batch[0]["C1G2_PC"] == 0x3000
        # sllurp sees exactly the same fields (under its own names, plus its "EPC" alias).
        _, decoded = next(x for x in client.sllurp if x[0] == "RO_ACCESS_REPORT")
        tag = decoded["TagReportData"][0]
        assert tag["EPC-96"] == EPC1.encode()
        sllurp_names = {"EPC_96": "EPC-96", "C1G2_PC": "C1G2PC", "C1G2_CRC": "C1G2CRC"}
        assert set(tag) - {"EPC"} == {sllurp_names.get(k, k) for k in expected}


async def test_long_epc_is_reported_as_epcdata(sim: LlrpSimulator) -> None:
    epc128 = "e2801160600002084f6a1b2c3d4e5f60"
    sim.add_tag(SimTag(epc=epc128, antenna=1))
    async with await connected(sim) as client:
        await start_rospec(client, rospec(trigger=1, n=1))
        (batch,) = await reports(client, 1)
        assert "EPC_96" not in batch[0]
        assert batch[0]["EPCData"]["EPC"].count == 128
        assert epc_hex(batch[0]) == epc128
        assert client.sllurp[-1][1]["TagReportData"][0]["EPC"] == epc128.encode()


async def test_end_of_aispec_reports_aggregate_reads(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1, rssi_mean=-50, rssi_spread=3.0))
    sim.add_tag(SimTag(epc=EPC2, antenna=2, rssi_mean=-60, rssi_spread=3.0))
    async with await connected(sim) as client:
        # AISpec ends after 5 inventory rounds; report at its end (N=0: no limit).
        spec = rospec(
            trigger=1,
            n=0,
            ai_stop=(3, 0),
            observation={
                "TriggerType": 2,
                "NumberOfTags": 0,
                "NumberOfAttempts": 5,
                "T": 0,
                "Timeout": 0,
            },
        )
        await start_rospec(client, spec)
        batch, again = await reports(client, 2)
        assert {epc_hex(t) for t in batch} == {EPC1, EPC2}
        assert all(t["TagSeenCount"] == 5 for t in batch)
        assert len(again) == 2


async def test_rospec_lifecycle_rules(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    async with await connected(sim) as client:
        spec = rospec(start=0, trigger=1, n=1)
        assert status(await client.request("START_ROSPEC", {"ROSpecID": 1})) != 0  # no such ROSpec
        assert status(await client.request("ADD_ROSPEC", {"ROSpec": spec})) == 0
        dup = await client.request("ADD_ROSPEC", {"ROSpec": spec})
        assert "already exists" in dup.params["LLRPStatus"]["ErrorDescription"]
        over = await client.request("ADD_ROSPEC", {"ROSpec": rospec(2)})
        assert status(over) == StatusCode.M_OverflowParameter  # a Speedway holds one ROSpec
        assert status(await client.request("START_ROSPEC", {"ROSpecID": 1})) != 0  # disabled
        assert status(await client.request("ENABLE_ROSPEC", {"ROSpecID": 1})) == 0
        assert sim.rospecs[1].state == 1  # Null start trigger: enabled, waiting
        assert status(await client.request("START_ROSPEC", {"ROSpecID": 1})) == 0
        await client.expect("RO_ACCESS_REPORT")
        got = await client.request("GET_ROSPECS")
        assert [r["CurrentState"] for r in got.params["ROSpec"]] == [2]
        assert status(await client.request("DISABLE_ROSPEC", {"ROSpecID": 0})) == 0
        assert sim.rospecs[1].state == 0
        assert status(await client.request("DELETE_ACCESSSPEC", {"AccessSpecID": 0})) == 0
        assert status(await client.request("DELETE_ROSPEC", {"ROSpecID": 0})) == 0
        assert sim.rospecs == {}
        bad_power = rospec(3)
        bad_power["AISpec"][0]["InventoryParameterSpec"][0]["AntennaConfiguration"][0][
            "RFTransmitter"
        ] = {"HopTableID": 1, "ChannelIndex": 1, "TransmitPower": 82}
        resp = await client.request("ADD_ROSPEC", {"ROSpec": bad_power})
        assert "TransmitPower index 82" in resp.params["LLRPStatus"]["ErrorDescription"]
        bad_antenna = rospec(4, antennas=[5])
        assert status(await client.request("ADD_ROSPEC", {"ROSpec": bad_antenna})) != 0
        # Every frame was decoded by sllurp too, except GET_ROSPECS_RESPONSE it has no decoder for.
        assert [n for n, _ in client.sllurp].count("") == 1


async def test_gen2_sessions_decide_whether_static_tags_answer_again(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    five_rounds = {"TriggerType": 2, "NumberOfTags": 0, "NumberOfAttempts": 5, "T": 0, "Timeout": 0}
    async with await connected(sim) as client:
        # Session 2, single target: a static tag answers once and then stays quiet.
        spec = rospec(trigger=1, n=0, session=2, ai_stop=(3, 0), observation=five_rounds)
        await start_rospec(client, spec)
        (batch,) = await reports(client, 1)
        assert batch[0]["TagSeenCount"] == 1
        assert status(await client.request("DELETE_ROSPEC", {"ROSpecID": 0})) == 0
        # Impinj dual target re-reads it every round.
        spec = rospec(
            trigger=1, n=0, session=2, search_mode=2, ai_stop=(3, 0), observation=five_rounds
        )
        await start_rospec(client, spec)
        (batch,) = await reports(client, 1)
        assert batch[0]["TagSeenCount"] == 5
        assert status(await client.request("DELETE_ROSPEC", {"ROSpecID": 0})) == 0
        # Session 0 needs no trick.
        spec = rospec(trigger=1, n=0, session=0, ai_stop=(3, 0), observation=five_rounds)
        await start_rospec(client, spec)
        (batch,) = await reports(client, 1)
        assert batch[0]["TagSeenCount"] == 5


async def test_rospec_and_aispec_events(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    async with await connected(sim) as client:
        await client.request(
            "SET_READER_CONFIG",
            {
                "ReaderEventNotificationSpec": {
                    "EventNotificationState": [
                        {"EventType": 2, "NotificationState": True},
                        {"EventType": 6, "NotificationState": True},
                    ]
                }
            },
        )
        two_rounds = {
            "TriggerType": 2,
            "NumberOfTags": 0,
            "NumberOfAttempts": 2,
            "T": 0,
            "Timeout": 0,
        }
        await start_rospec(
            client, rospec(trigger=1, n=0, ai_stop=(3, 0), observation=two_rounds, stop=(1, 60_000))
        )
        kinds = []
        while len(kinds) < 3:
            ev = (await client.expect("READER_EVENT_NOTIFICATION")).params[
                "ReaderEventNotificationData"
            ]
            kinds.append(next(k for k in ev if k.endswith("Event")))
        assert kinds[:2] == ["ROSpecEvent", "AISpecEvent"]
        assert client.sllurp[-1][1]["ReaderEventNotificationData"]["AISpecEvent"]["SpecIndex"] == 1
        assert status(await client.request("STOP_ROSPEC", {"ROSpecID": 1})) == 0
        end = [
            d["ReaderEventNotificationData"]["ROSpecEvent"]
            for n, d in client.sllurp
            if n == "READER_EVENT_NOTIFICATION"
            and "ROSpecEvent" in d["ReaderEventNotificationData"]
        ]
        assert (end[0]["EventType"], end[-1]["EventType"]) == ("Start_of_ROSpec", "End_of_ROSpec")


async def test_tags_added_removed_and_moved_while_running(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    async with await connected(sim) as client:
        await start_rospec(client, rospec(trigger=1, n=1))
        first = (await reports(client, 1))[0][0]
        assert (epc_hex(first), first["AntennaID"]) == (EPC1, 1)
        sim.move_tag(EPC1, 3)
        sim.add_tag(SimTag(epc=EPC2, antenna=2))
        want = {(EPC1, 3), (EPC2, 2)}
        got: set[tuple[str, int]] = set()
        async with asyncio.timeout(10):
            while not want <= got:
                msg = await client.expect("RO_ACCESS_REPORT")
                got |= {(epc_hex(t), t["AntennaID"]) for t in msg.params["TagReportData"]}
        sim.remove_tag(EPC1)
        sim.remove_tag(EPC2)
        quiet_from = sim.stats.tags_reported
        cycles = sim.stats.inventory_cycles
        await sim.wait_until(lambda: sim.stats.inventory_cycles >= cycles + 3)
        assert sim.stats.tags_reported == quiet_from


async def test_random_tags_are_spread_over_antennas(sim: LlrpSimulator) -> None:
    tags = sim.add_random_tags(n=200, antennas=[1, 2, 3, 4], seed=7)
    assert len({t.epc for t in tags}) == 200
    assert {t.antenna for t in tags} == {1, 2, 3, 4}
    assert all(len(t.epc) == 24 and t.epc.startswith("30") for t in tags)
    again = LlrpSimulator(seed=1).add_random_tags(n=200, seed=7)
    assert [t.epc for t in again] == [t.epc for t in tags]
    async with await connected(sim) as client:
        await start_rospec(client, rospec(trigger=2, n=200, selector={"EnableTagSeenCount": False}))
        (batch,) = await reports(client, 1)
        assert {epc_hex(t) for t in batch} == {t.epc for t in tags}
        where = {t.epc: t.antenna for t in tags}
        assert all(where[epc_hex(t)] == t["AntennaID"] for t in batch)


# --- GPIO ----------------------------------------------------------------------------------------


async def test_gpo_write_is_recorded_and_awaitable(sim: LlrpSimulator) -> None:
    calls: list[tuple[int, bool]] = []
    sim.gpo_listeners.append(lambda port, high: calls.append((port, high)))
    async with await connected(sim) as client:
        waiter = asyncio.create_task(sim.wait_gpo(1, True, timeout=10), name="test-wait-gpo")
        await asyncio.sleep(0)
        assert not waiter.done()
        resp = await client.request(
            "SET_READER_CONFIG", {"GPOWriteData": [{"GPOPortNumber": 1, "GPOData": True}]}
        )
        assert status(resp) == 0
        await waiter
        assert sim.gpo_state == {1: True, 2: False, 3: False, 4: False}
        assert [(w.port, w.high) for w in sim.gpo_history] == [(1, True)]
        assert calls == [(1, True)]
        await client.request(
            "SET_READER_CONFIG", {"GPOWriteData": [{"GPOPortNumber": 1, "GPOData": False}]}
        )
        await sim.wait_gpo(1, False, timeout=1)
        assert [(w.port, w.high) for w in sim.gpo_history] == [(1, True), (1, False)]
        assert sim.gpo_history[0].monotonic <= sim.gpo_history[1].monotonic


async def test_gpi_event_only_when_enabled(sim: LlrpSimulator) -> None:
    async with await connected(sim) as client:
        await client.request(
            "SET_READER_CONFIG",
            {
                "ReaderEventNotificationSpec": {
                    "EventNotificationState": [{"EventType": 1, "NotificationState": True}]
                }
            },
        )
        sent = sim.stats.events_sent
        sim.set_gpi(1, True)  # port not enabled yet (factory default): no event
        assert sim.stats.events_sent == sent
        await client.request(
            "SET_READER_CONFIG", {"GPIPortCurrentState": [{"GPIPortNum": 1, "Config": True}]}
        )
        sim.set_gpi(1, False)
        sim.set_gpi(1, True)
        events = []
        for _ in range(2):
            ev = await client.expect("READER_EVENT_NOTIFICATION")
            events.append(ev.params["ReaderEventNotificationData"]["GPIEvent"])
            assert (
                client.sllurp[-1][1]["ReaderEventNotificationData"]["GPIEvent"]["GPIPortNumber"]
                == 1
            )
        assert events == [
            {"GPIPortNumber": 1, "GPIEvent": False},
            {"GPIPortNumber": 1, "GPIEvent": True},
        ]
        with pytest.raises(ValueError, match="GPI port 9"):
            sim.set_gpi(9, True)


async def test_gpi_start_trigger_starts_rospec(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    async with await connected(sim) as client:
        await client.request(
            "SET_READER_CONFIG", {"GPIPortCurrentState": [{"GPIPortNum": 2, "Config": True}]}
        )
        spec = rospec(start=3, trigger=1, n=1)
        spec["ROBoundarySpec"]["ROSpecStartTrigger"]["GPITriggerValue"] = {
            "GPIPortNum": 2,
            "GPIEvent": True,
            "Timeout": 0,
        }
        await start_rospec(client, spec)
        assert sim.rospecs[1].state == 1
        sim.set_gpi(2, True)
        await sim.wait_inventorying()
        report = await client.expect("RO_ACCESS_REPORT")
        assert epc_hex(report.params["TagReportData"][0]) == EPC1


async def test_second_connection_is_refused(sim: LlrpSimulator) -> None:
    async with await connected(sim) as first:
        second = await RawClient.connect(sim.host, sim.port)
        refused = await second.expect("READER_EVENT_NOTIFICATION")
        assert (
            refused.params["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"] == 2
        )
        assert (
            second.sllurp[-1][1]["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"]
            == "Failed (a Client initiated connection already exists)"
        )
        assert await second.eof() == b""
        await second.close()
        note = await first.expect("READER_EVENT_NOTIFICATION")
        assert note.params["ReaderEventNotificationData"]["ConnectionAttemptEvent"]["Status"] == 4
        assert sim.connections.rejected == 1
        assert sim.connections.active == 1
        assert status(await first.request("GET_READER_CAPABILITIES", {"RequestedData": 1})) == 0


async def test_stop_closes_clients(sim: LlrpSimulator) -> None:
    client = await connected(sim)
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    await start_rospec(client, rospec(trigger=1, n=1))
    await sim.stop()
    rest = await client.eof()
    assert len(rest) < 10_000
    await client.close()
    assert sim.connections.active == 0
    with pytest.raises(OSError):
        await RawClient.connect(sim.host, sim.port)


def test_rejects_bad_tags_and_antennas() -> None:
    sim = LlrpSimulator(antennas=2)
    with pytest.raises(ValueError, match="antenna 3"):
        sim.add_tag(SimTag(epc=EPC1, antenna=3))
    with pytest.raises(ValueError, match="hex"):
        SimTag(epc="zz")
    with pytest.raises(ValueError, match="words"):
        SimTag(epc="3000ab")
    with pytest.raises(ValueError, match="read_probability"):
        SimTag(epc=EPC1, read_probability=1.5)
    with pytest.raises(KeyError):
        sim.remove_tag(EPC1)


def test_sllurp_decodes_what_it_is_given() -> None:
    # Guard for the helper itself: sllurp decodes a hand-built keepalive.
    assert sllurp_decode(HEADER.pack((1 << 10) | 62, 10, 5))[0] == "KEEPALIVE"


async def test_reports_held_until_enable_events_and_reports(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1))
    first = await connected(sim)
    hold = {"EventsAndReports": {"HoldEventsAndReportsUponReconnect": True}}
    assert status(await first.request("SET_READER_CONFIG", hold)) == 0
    await start_rospec(first, rospec(trigger=1, n=1))
    await first.request("CLOSE_CONNECTION")
    await first.eof()
    await first.close()
    await sim.wait_until(lambda: sim.connections.active == 0)
    # The ROSpec keeps running; with no client its reports go nowhere.
    dropped = sim.stats.reports_dropped
    await sim.wait_until(lambda: sim.stats.reports_dropped > dropped)
    sent = sim.stats.reports_sent
    async with await connected(sim) as second:
        conn = sim._current
        assert conn is not None
        await sim.wait_until(lambda: len(conn.held) >= 2)
        assert sim.stats.reports_sent == sent  # held, not sent
        second.send("ENABLE_EVENTS_AND_REPORTS")
        report = await second.expect("RO_ACCESS_REPORT")
        assert epc_hex(report.params["TagReportData"][0]) == EPC1


async def test_unplugged_antenna_stops_reading_and_says_so(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=2, also_at={3: -70.0}))
    async with await connected(sim) as client:
        await start_rospec(client, rospec(trigger=1, n=1))
        await sim.wait_until(lambda: sim.stats.tags_reported >= 2)
        sim.set_antenna_connected(2, False)
        event = await client.expect("READER_EVENT_NOTIFICATION")
        assert event.params["ReaderEventNotificationData"]["AntennaEvent"] == {
            "EventType": 0,
            "AntennaID": 2,
        }
        assert client.sllurp[-1][1]["ReaderEventNotificationData"]["AntennaEvent"]["EventType"] == (
            "Disconnected"
        )
        for batch in await reports(client, 4):
            assert {t["AntennaID"] for t in batch} == {3}
        props = await client.request("GET_READER_CONFIG", {"RequestedData": 2})
        assert [p["AntennaConnected"] for p in props.params["AntennaProperties"]] == [
            True,
            False,
            True,
            True,
        ]


async def test_trigger_none_reports_only_on_get_report(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=4))
    async with await connected(sim) as client:
        msg_id = client.send("GET_REPORT")
        nothing = await client.expect("RO_ACCESS_REPORT")
        assert (nothing.msg_id, nothing.params) == (msg_id, {})  # no TagReportData at all
        assert client.sllurp[-1][1]["TagReportData"] == []
        await start_rospec(client, rospec(trigger=0, n=1))
        cycles = sim.stats.inventory_cycles
        await sim.wait_until(lambda: sim.stats.inventory_cycles >= cycles + 3)
        assert sim.stats.reports_sent == 1  # only the empty one asked for
        msg_id = client.send("GET_REPORT")
        got = await client.expect("RO_ACCESS_REPORT")
        assert got.msg_id == msg_id
        (tag,) = got.params["TagReportData"]
        assert (epc_hex(tag), tag["AntennaID"]) == (EPC1, 4)
        assert tag["TagSeenCount"] >= 3


async def test_transmit_power_weakens_replies_until_unheard(sim: LlrpSimulator) -> None:
    sim.add_tag(SimTag(epc=EPC1, antenna=1, rssi_mean=-60.0, rssi_spread=0.0))
    sim.add_tag(SimTag(epc=EPC2, antenna=2, rssi_mean=-70.0, rssi_spread=0.0))
    spec = rospec(trigger=2, n=0, stop=(1, 200))
    ips = spec["AISpec"][0]["InventoryParameterSpec"][0]
    # Antenna 1 at 25 dBm (5 dB down), antenna 2 at 10 dBm (20 dB down: -90 dBm, under -84).
    ips["AntennaConfiguration"] = [
        {
            **ips["AntennaConfiguration"][0],
            "AntennaID": 1,
            "RFTransmitter": {"HopTableID": 1, "ChannelIndex": 1, "TransmitPower": 61},
        },
        {
            **ips["AntennaConfiguration"][0],
            "AntennaID": 2,
            "RFTransmitter": {"HopTableID": 1, "ChannelIndex": 1, "TransmitPower": 1},
        },
    ]
    assert sim.personality.power_dbm[60] == 25.0
    async with await connected(sim) as client:
        await start_rospec(client, spec)
        (batch,) = await reports(client, 1)
        assert [(epc_hex(t), t["PeakRSSI"]) for t in batch] == [(EPC1, -65)]
