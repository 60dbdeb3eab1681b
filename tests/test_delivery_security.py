"""mTLS, CRL and key pins against a real mosquitto; plaintext refusal; signed commands over MQTT."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.audit_policy import AuditTrail
from agent.config import ConfigError, parse_config
from agent.documents import Documents, Parsed, doc_key
from agent.domain.access import AllowList
from agent.mqtt.config import MqttConfig
from agent.mqtt.publisher import Publisher
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import ALLOW_LIST, DocumentError, DocumentVerifier, canonical_json
from agent.store import Store
from agent.trusted_time import TrustedClock, sync_source
from backend.keys import BackendKeys
from backend.signing import allow_list_doc, sign_document
from backend.subscriber import stop_client
from drivers.types import SystemClock
from tests.delivery_helpers import (
    CABINET,
    PROTOCOLS,
    SITE,
    append_sealed,
    backend,
    mqtt_cfg,
    open_store,
    running,
    sealer_for,
    until,
)
from tests.mqtt_fixtures import (
    BrokerTls,
    Mosquitto,
    Pki,
    spki_sha256,
)

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- plaintext refusal


@pytest.mark.parametrize(
    "host", ["10.0.0.5", "broker.example.com", "192.168.1.10", "::ffff:1.2.3.4"]
)
def test_plaintext_to_non_loopback_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="plaintext MQTT to non-loopback broker"):
        MqttConfig(host=host)
    assert MqttConfig(host=host, allow_plaintext=True).effective_port == 1883
    tls = MqttConfig.model_validate({"host": host, "tls": {"ca_file": "/etc/ca.pem"}})
    assert tls.effective_port == 8883


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.8.9.10"])
def test_plaintext_to_loopback_is_allowed(host: str) -> None:
    assert MqttConfig(host=host).tls is None


def test_plaintext_refusal_surfaces_through_the_agent_config() -> None:
    example = tomllib.loads((ROOT / "config" / "agent.example.toml").read_text())
    example["mqtt"] = {"host": "10.1.2.3"}
    with pytest.raises(ConfigError) as err:
        parse_config(example)
    assert any(p.startswith("mqtt:") and "plaintext" in p for p in err.value.problems), err.value


def test_tls_config_validation() -> None:
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        MqttConfig.model_validate(
            {"host": "b", "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem"}}
        )
    with pytest.raises(ValueError, match="64 hex digits"):
        MqttConfig.model_validate({"host": "b", "tls": {"ca_file": "/ca", "spki_pins": ["abc"]}})


# ---------------------------------------------------------------- mTLS


@dataclass
class TlsSetup:
    broker: Mosquitto
    pki: Pki
    server_cert: Any
    client: tuple[Path, Path]


@pytest.fixture
def tls_broker(tmp_path: Path) -> Any:
    pki = Pki(tmp_path / "pki")
    server_crt, server_key, server_cert = pki.issue("broker", server=True)
    client_crt, client_key, _ = pki.issue("cabinet-good", server=False)
    _, _, revoked_cert = pki.issue("cabinet-revoked", server=False)
    pki.revoke(revoked_cert)
    broker = Mosquitto(
        tmp_path / "broker",
        tls=BrokerTls(
            pki.ca_file, server_crt, server_key, require_certificate=True, crl_file=pki.crl_file
        ),
    )
    broker.start()
    try:
        yield TlsSetup(broker, pki, server_cert, (client_crt, client_key))
    finally:
        broker.stop()


def _tls_cfg(setup: TlsSetup, cert: tuple[Path, Path] | None, **tls: Any) -> MqttConfig:
    tls_section: dict[str, Any] = {"ca_file": str(setup.pki.ca_file), **tls}
    if cert is not None:
        tls_section["cert_file"] = str(cert[0])
        tls_section["key_file"] = str(cert[1])
    return mqtt_cfg(setup.broker.port, tls=tls_section)


async def _deliver(
    tmp_path: Path, cfg: MqttConfig, keys: BackendKeys, expect_ok: bool
) -> Publisher:
    async with open_store(tmp_path / "state.db") as store:
        await append_sealed(store, sealer_for(keys), 5)
        pub = Publisher(cfg, SITE, CABINET, store)
        async with running(pub):
            if expect_ok:
                assert await until(lambda: pub.stats.acked == 5), pub.stats
            else:
                assert await until(lambda: pub.stats.reconnects >= 2), pub.stats
                assert pub.stats.acked == 0
                assert not pub.stats.connected
        depth = (await store.stats()).depth
        assert depth == (0 if expect_ok else 5), "refused connections must not drain the outbox"
    return pub


async def test_mtls_good_client_is_accepted(tmp_path: Path, tls_broker: TlsSetup) -> None:
    keys = backend(tmp_path / "backend")
    pin = spki_sha256(tls_broker.server_cert)
    await _deliver(tmp_path, _tls_cfg(tls_broker, tls_broker.client, spki_pins=[pin]), keys, True)


@pytest.mark.parametrize("variant", ["foreign-ca", "revoked", "missing"])
async def test_mtls_bad_client_is_refused(
    tmp_path: Path, tls_broker: TlsSetup, variant: str
) -> None:
    keys = backend(tmp_path / "backend")
    if variant == "foreign-ca":
        foreign = Pki(tmp_path / "foreign", name="foreign-ca")
        crt, key, _ = foreign.issue("cabinet-good", server=False)
        cert: tuple[Path, Path] | None = (crt, key)
    elif variant == "revoked":
        cert = (
            tls_broker.pki.dir / "cabinet-revoked.crt",
            tls_broker.pki.dir / "cabinet-revoked.key",
        )
    else:
        cert = None
    pub = await _deliver(tmp_path, _tls_cfg(tls_broker, cert), keys, False)
    assert pub.stats.last_error


async def test_wrong_key_pin_is_refused(tmp_path: Path, tls_broker: TlsSetup) -> None:
    keys = backend(tmp_path / "backend")
    cfg = _tls_cfg(tls_broker, tls_broker.client, spki_pins=["00" * 32])
    pub = await _deliver(tmp_path, cfg, keys, False)
    assert "spki_pins" in (pub.stats.last_error or "")


async def test_broker_from_foreign_ca_is_refused(tmp_path: Path, tls_broker: TlsSetup) -> None:
    keys = backend(tmp_path / "backend")
    foreign = Pki(tmp_path / "foreign", name="foreign-ca")
    cfg = mqtt_cfg(
        tls_broker.broker.port,
        tls={
            "ca_file": str(foreign.ca_file),
            "cert_file": str(tls_broker.client[0]),
            "key_file": str(tls_broker.client[1]),
        },
    )
    pub = await _deliver(tmp_path, cfg, keys, False)
    assert "certificate" in (pub.stats.last_error or "")


# ---------------------------------------------------------------- signed commands


def raw_publish(port: int, topic: str, payload: bytes, *, retain: bool = True) -> None:
    """Publish like the backend does (QoS 1, retained), from a plain paho client."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="backend-admin")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        stop_client(client)


def _allow_list(keys: BackendKeys, version: int, *, expires_in: timedelta, badge: str) -> bytes:
    pseudonym = Pseudonymizer.from_site_key(SITE, keys.site).badge(badge)
    now = datetime.now(UTC).replace(microsecond=0)
    doc = allow_list_doc(
        SITE,
        CABINET,
        version,
        now + expires_in,
        {pseudonym: ["technician"]},
        issued_at=now - timedelta(hours=2),
    )
    return sign_document(keys.signing_private, keys.signing_kid, doc)


@dataclass
class Installed:
    """What the production document sink (``agent.documents.Documents``) did, as the app sees it."""

    applied: list[tuple[str, Parsed | None]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # reasons, in order


async def _documents(store: Store, keys: BackendKeys, seen: Installed, synced: Path) -> Documents:
    """The sink the app installs documents through, loaded from ``store`` as at start (with a
    time source that says synchronised, so the wall clock judges expiry)."""
    verifier = DocumentVerifier({keys.signing_kid: keys.signing_public}, SITE, CABINET)
    synced.touch()
    docs = Documents(
        verifier,
        TrustedClock(SystemClock(), sync=sync_source(f"file:{synced}")),
        AuditTrail(lambda: store),
        apply=lambda kind, parsed: seen.applied.append((kind, parsed)),
        on_refused=lambda kind, reason: seen.refused.append(reason),
    )
    await docs.load(store)
    await docs.clock.load(store, evidence=docs.evidence())
    return docs


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_signed_allow_list_over_cmd_topic(
    tmp_path: Path, mosquitto: Mosquitto, protocol: str
) -> None:
    keys = backend(tmp_path / "backend")
    seen = Installed()
    topic = f"cabinets/v1/{SITE}/{CABINET}/cmd/allow-list"
    async with open_store(tmp_path / "state.db") as store:
        docs = await _documents(store, keys, seen, tmp_path / "time-synced")
        cfg = mqtt_cfg(mosquitto.port, protocol=protocol)
        pub = Publisher(cfg, SITE, CABINET, store, verifier=docs, documents=docs)
        v2 = _allow_list(keys, 2, expires_in=timedelta(days=1), badge="04A1B2C3D4")
        async with running(pub):
            assert await until(lambda: pub.stats.connected)
            raw_publish(mosquitto.port, topic, v2)
            assert await until(lambda: len(seen.applied) == 1)
            kind, parsed = seen.applied[0]
            assert kind == ALLOW_LIST
            assert isinstance(parsed, AllowList)
            assert parsed.version == 2
            assert docs.documents[ALLOW_LIST].version == 2
            assert docs.installed(ALLOW_LIST) == v2

            # Tampered: one role changed after signing.
            body = json.loads(v2)
            entries = body["doc"]["body"]["entries"]
            entries[next(iter(entries))] = ["admin"]
            tampered = canonical_json(body)
            # Rolled back: a validly signed older version.
            v1 = _allow_list(keys, 1, expires_in=timedelta(days=1), badge="04A1B2C3D4")
            # Expired: validly signed, newer, but out of date.
            v3_expired = _allow_list(keys, 3, expires_in=-timedelta(minutes=30), badge="04A1B2C3D4")
            for payload in (tampered, v1, v3_expired):
                raw_publish(mosquitto.port, topic, payload)
            assert await until(lambda: pub.stats.commands_rejected >= 3)
        assert seen.refused == ["bad-signature", "rollback", "expired"], seen.refused
        assert len(seen.applied) == 1, "a refused document must never be applied"
        assert docs.installed(ALLOW_LIST) == v2
        assert await store.kv_get(doc_key(ALLOW_LIST)) == v2
        await docs.audit.flush()
        # The retained v2 copy is never what is refused; a restart keeps the rollback floor.
        docs2 = await _documents(store, keys, Installed(), tmp_path / "time-synced")
        assert docs2.installed(ALLOW_LIST) == v2
        with pytest.raises(DocumentError) as refused:
            docs2.verify(v1, ALLOW_LIST, docs2.clock.now(), current=docs2.installed(ALLOW_LIST))
        assert refused.value.reason == DocumentError.ROLLBACK


async def test_command_limits_and_missing_verifier(tmp_path: Path) -> None:
    keys = backend(tmp_path / "backend")
    topic = f"cabinets/v1/{SITE}/{CABINET}/cmd/allow-list"
    doc = _allow_list(keys, 1, expires_in=timedelta(days=1), badge="04A1B2C3D4")
    seen = Installed()
    async with open_store(tmp_path / "state.db") as store:
        docs = await _documents(store, keys, seen, tmp_path / "time-synced")
        # No verifier configured: documents are refused, never applied unverified.
        bare = Publisher(mqtt_cfg(1), SITE, CABINET, store, documents=docs)
        assert not await bare.handle_command(topic, doc)
        pub = Publisher(
            mqtt_cfg(1, max_command_bytes=1024),
            SITE,
            CABINET,
            store,
            verifier=docs,
            documents=docs,
        )
        assert not await pub.handle_command(topic, b"{" + b" " * 2000 + b"}")
        assert not await pub.handle_command(f"cabinets/v1/{SITE}/{CABINET}/cmd/other", doc)
        assert not await pub.handle_command(topic, b"")  # cleared retained message: ignored
        assert seen.refused == ["no-verifier", "malformed"]
        assert seen.applied == []
        assert docs.installed(ALLOW_LIST) is None
        assert await pub.handle_command(topic, doc)
        assert docs.installed(ALLOW_LIST) == doc
        assert await pub.handle_command(topic, doc), "re-delivery of the installed doc is fine"
        assert pub.stats.commands_accepted == 1
        assert len(seen.applied) == 1
        await docs.audit.flush()
