"""Delivery meets the store's limits: outbox quota, a corrupt database, and no raw badge ids."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.mqtt.publisher import Publisher
from agent.privacy.envelope import EnvelopeHeader
from agent.privacy.pseudonym import Pseudonymizer
from agent.store import AlertKind, OutboxRow, StoreAlert
from tests.delivery_helpers import (
    CABINET,
    SITE,
    Collector,
    assert_exact,
    backend,
    mqtt_cfg,
    open_store,
    running,
    sealed_rows,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids


async def test_outbox_quota_drops_by_policy_alerts_and_delivery_resumes(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = backend(tmp_path / "backend")
    sealer = sealer_for(keys)
    alerts: list[StoreAlert] = []
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(tmp_path / "state.db", alerts, max_bytes=64 * 1024) as store:
            written: list[OutboxRow] = []
            # Broker unreachable for now: the outbox fills past its quota.
            for _ in range(10):
                for priority, n in ((0, 10), (2, 40)):
                    rows = sealed_rows(sealer, store.next_seq_nowait(), n, priority=priority)
                    await store.append_events(rows)
                    written += rows
            dropped = {s for a in alerts if a.kind == AlertKind.OVERFLOW_DROPPED for s in a.seqs}
            assert dropped, "the quota must have been hit"
            assert all(r.priority == 2 for r in written if r.seq in dropped)
            survivors = [r for r in written if r.seq not in dropped]
            assert (await store.stats()).depth == len(survivors)
            pub = Publisher(mqtt_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: len(collector.events) >= len(survivors), 60)
                assert await until(lambda: pub.stats.acked == len(survivors))
            assert (await store.stats()).depth == 0
        assert_exact(collector, survivors)
        assert all(r.seq in collector.seqs() for r in written if r.priority == 0)
    finally:
        collector.stop()


async def test_corrupt_database_is_quarantined_and_publisher_runs(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = backend(tmp_path / "backend")
    db = tmp_path / "state.db"
    db.write_bytes(b"this is not a database\x00" * 4096)
    alerts: list[StoreAlert] = []
    collector = Collector(mosquitto.port, keys).start()
    try:
        async with open_store(db, alerts) as store:
            assert any(a.kind == AlertKind.CORRUPT_QUARANTINED for a in alerts), alerts
            quarantined = [p for p in tmp_path.iterdir() if p.name.startswith("state.db.")]
            assert quarantined, list(tmp_path.iterdir())
            rows = sealed_rows(sealer_for(keys), store.next_seq_nowait(), 20)
            await store.append_events(rows)
            pub = Publisher(mqtt_cfg(mosquitto.port), SITE, CABINET, store)
            async with running(pub):
                assert await until(lambda: len(collector.events) >= 20, 60)
        assert_exact(collector, rows)
    finally:
        collector.stop()


RAW_BADGES = ["04A1B2C3D4", "0012345678", "DEADBEEF42"]


async def test_no_raw_badge_id_in_db_logs_or_mqtt(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    keys = backend(tmp_path / "backend")
    sealer = sealer_for(keys)
    pseudonymizer = Pseudonymizer.from_site_key(SITE, keys.site)
    sniffer = Collector(mosquitto.port, keys, extra_opts={"topic": "#"}).start()
    try:
        with caplog.at_level(logging.DEBUG):
            async with open_store(tmp_path / "db" / "state.db") as store:
                rows = []
                pseudonyms = []
                for i, raw in enumerate(RAW_BADGES * 5):
                    seq = store.next_seq_nowait() + i
                    eid = uuid.uuid4()
                    pseudonym = pseudonymizer.badge(raw)  # the raw id dies here
                    pseudonyms.append(pseudonym)
                    body = json.dumps(
                        {"type": "session.opened", "seq": seq, "badge": pseudonym}
                    ).encode()
                    envelope = sealer.seal(EnvelopeHeader(sealer.key_id, CABINET, seq, eid), body)
                    rows.append(
                        OutboxRow(seq, eid, 0, "session.opened", datetime.now(UTC), envelope)
                    )
                await store.append_events(rows)
                pub = Publisher(mqtt_cfg(mosquitto.port), SITE, CABINET, store, key_ids=["hpke1"])
                async with running(pub):
                    assert await until(lambda: len(sniffer.events) >= len(rows), 60)
                    assert await until(lambda: pub.stats.acked == len(rows))
        # The sniffer (subscribed to '#') saw events and the retained status message.
        assert len(sniffer.raw_payloads) > len(rows)
        dump = tmp_path / "mqtt-payloads.bin"
        dump.write_bytes(b"\n".join(sniffer.raw_payloads))
        log = tmp_path / "agent.log"
        log.write_text(caplog.text)
        assert caplog.text, "the scan needs log text to prove anything"
        mosquitto.stop()  # flush the broker's persistence file, which also holds payloads
        scanned = [tmp_path / "db", dump, log, mosquitto.dir]
        assert_no_raw_ids(scanned, RAW_BADGES)
        # Pseudonyms are personal data too: they exist only inside the ciphertext.
        for path in (tmp_path / "db", dump, mosquitto.dir):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                data = f.read_bytes()
                assert not any(p.encode() in data for p in pseudonyms), f
        decoded = {json.loads(e.plaintext)["badge"] for e in sniffer.events}
        assert decoded == set(pseudonyms)
    finally:
        sniffer.stop()
