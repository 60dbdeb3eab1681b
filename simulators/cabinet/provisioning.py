"""What the agent needs to play a scenario: signed documents (allow-list of pseudonyms, asset
registry), the ``[domain]`` drawers and an agent config wired to the simulators, and the
retained MQTT messages that deliver the documents."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from simulators.cabinet.scenario import Person, Scenario, ScenarioError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from backend.keys import SiteKey

# Short timers so a whole door cycle takes about a second: tests and demos, not production.
FAST_DOMAIN: dict[str, Any] = {
    "min_reads": 2,
    "stable_ms": 300,
    "scan_min_ms": 500,
    "scan_max_ms": 4000,
    "confirm_pass": True,
    "max_rescans": 2,
    "unlock_pulse_s": 4.0,
    "relock_after_s": 4.0,
    "left_open_s": 60.0,
    "reopen_grace_s": 0.5,
    "lockout_denials": 5,
    "lockout_window_s": 120.0,
    "lockout_duration_s": 300.0,
    "background_period_s": 0,
    # Reports come every 100 ms (agent_config): a round holds about two of them.
    "presence_round_ms": 200,
}


@dataclass(frozen=True)
class AgentArtefacts:
    """The agent-side view of a scenario: signed documents, drawers, and names for matching."""

    site_id: str
    cabinet_id: str
    allow_list: bytes  # signed wire form
    asset_registry: bytes  # signed wire form
    allow_list_expires_at: datetime
    domain: dict[str, Any]  # the [domain] section
    names: dict[str, str]  # pseudonym → person name (every person, listed or not)
    items: dict[str, str]  # epc → item name
    registry_installed: bool = True  # false: the asset registry is never given to the agent

    def name_of(self, actor: str) -> str:
        return self.names.get(actor, actor)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``allow-list.json`` and ``asset-registry.json`` (no raw badge id in either)."""
        directory.mkdir(parents=True, exist_ok=True)
        allow = directory / "allow-list.json"
        registry = directory / "asset-registry.json"
        allow.write_bytes(self.allow_list)
        registry.write_bytes(self.asset_registry)
        return allow, registry


def build_artefacts(
    scenario: Scenario,
    *,
    site: SiteKey,
    signing_key: Ed25519PrivateKey,
    signing_kid: str,
    now: datetime | None = None,
    domain_base: Mapping[str, Any] = FAST_DOMAIN,
    allow_list_version: int | None = None,
    allow_list_expires_at: datetime | None = None,
    extra_people: Sequence[Person] = (),
) -> AgentArtefacts:
    """Pseudonymize the people with the site key and sign the allow-list and asset registry.

    ``extra_people`` (an installer, a test's marker badge) join the scenario's people.
    """
    from backend.signing import (
        allow_list_doc,
        asset_registry_doc,
        badge_pseudonyms,
        sign_document,
    )

    lay = scenario.cabinet
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    people = [*scenario.people, *extra_people]
    pseudo = badge_pseudonyms(lay.site_id, site, (p.badge for p in people))
    names = {pseudo[p.badge]: p.name for p in people}
    entries = {pseudo[p.badge]: list(p.roles) for p in people if p.listed}
    expires = allow_list_expires_at or issued + timedelta(seconds=scenario.allow_list.expires_in_s)
    version = scenario.allow_list.version if allow_list_version is None else allow_list_version
    allow = allow_list_doc(lay.site_id, lay.cabinet_id, version, expires, entries, issued_at=issued)
    assets: list[dict[str, Any]] = []
    for item in scenario.items:
        if not item.registered:
            continue
        asset: dict[str, Any] = {"epc": item.epc, "asset_id": item.asset, "name": item.name}
        if item.home_drawer is not None:
            asset["home_drawer"] = item.home_drawer
        if item.calibration_due is not None:
            asset["calibration_due"] = item.calibration_due.isoformat()
        elif item.calibration_due_in_days is not None:
            site_today = issued.astimezone(ZoneInfo(lay.timezone)).date()
            due = site_today + timedelta(days=item.calibration_due_in_days)
            asset["calibration_due"] = due.isoformat()
        if item.overdue_after_s is not None:
            asset["overdue_after_s"] = item.overdue_after_s
        if item.consumable:
            asset.update(consumable=True, sku=item.sku)
        if item.tid is not None:
            asset["tid"] = item.tid
        assets.append(asset)
    registry = asset_registry_doc(
        lay.site_id, lay.cabinet_id, 1, issued + timedelta(days=365), assets, issued_at=issued
    )
    domain = {
        **domain_base,
        **scenario.domain,
        "drawers": scenario.aliases(),
        "door_id": lay.door_id,
    }
    if scenario.at_night:
        domain.update(night_window(issued, lay.timezone))
    return AgentArtefacts(
        site_id=lay.site_id,
        cabinet_id=lay.cabinet_id,
        allow_list=sign_document(signing_key, signing_kid, allow),
        asset_registry=sign_document(signing_key, signing_kid, registry),
        allow_list_expires_at=expires,
        domain=domain,
        names=names,
        items={i.epc: i.name for i in scenario.items},
        registry_installed=scenario.asset_registry,
    )


def night_window(at: datetime, timezone: str) -> dict[str, str]:
    """``night_start``/``night_end``: the two hours around ``at`` on the clocks of
    ``timezone`` (so a scenario plays at night whenever it runs; the agent must judge the
    window in that zone, not in UTC, to see it)."""
    local = at.astimezone(ZoneInfo(timezone))
    start, end = local - timedelta(hours=1), local + timedelta(hours=1)
    return {"night_start": f"{start:%H:%M}", "night_end": f"{end:%H:%M}"}


def agent_config(
    scenario: Scenario,
    artefacts: AgentArtefacts,
    *,
    llrp_port: int,
    badge_url: str,
    key_dir: Path,
    state_dir: Path,
    mqtt_port: int | None = None,
    mqtt_host: str = "127.0.0.1",
    extra_badge_readers: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An agent config (as a dict; ``to_toml`` writes it) wired to the simulators, short timers."""
    lay = scenario.cabinet
    key_dir = key_dir.resolve()
    state_dir = state_dir.resolve()
    cfg: dict[str, Any] = {
        "cabinet": {
            "site_id": lay.site_id,
            "cabinet_id": lay.cabinet_id,
            "timezone": lay.timezone,
        },
        "logging": {"level": "INFO"},
        "readers": [
            {
                "type": "llrp",
                "id": lay.reader_id,
                "host": "127.0.0.1",
                "port": llrp_port,
                "antennas": scenario.antennas_in_use(),
                "keepalive_s": 1.0,
                "connect_timeout_s": 3.0,
                "inventory_deadline_s": 10.0,
                "report_timeout_ms": 100,
                "gpi_ports": [lay.sensor_gpi],
                "backoff": {"initial_s": 0.05, "max_s": 0.5},
                **({"read_tid": True} if lay.read_tid else {}),
            }
        ],
        "badge_readers": [
            {
                "id": lay.badge_reader_id,
                "url": badge_url,
                "protocol": "em4100",
                "repeat_interval_s": 0.3,
                "backoff": {"initial_s": 0.05, "max_s": 0.5},
            },
            *[dict(b) for b in extra_badge_readers],
        ],
        "door": {
            "id": lay.door_id,
            "reader": lay.reader_id,
            "sensor_gpi": lay.sensor_gpi,
            "lock_gpo": lay.lock_gpo,
            "release_pulse_s": float(artefacts.domain.get("unlock_pulse_s", 4.0)),
            "command_timeout_s": 3.0,
        },
        "domain": artefacts.domain,
        "store": {"path": str(state_dir / "state.db"), "synchronous": "NORMAL"},
        "privacy": {
            "site_key": str(key_dir / "site.key"),
            "seal_public_key": str(key_dir / "backend-hpke.pub"),
            "signing_public_keys": [str(key_dir / "signing.pub")],
        },
        "control": {"socket_path": str(_control_socket(state_dir))},
        "metrics": {"enabled": False},
    }
    if mqtt_port is not None:
        cfg["mqtt"] = {
            "host": mqtt_host,
            "port": mqtt_port,
            "keepalive_s": 5,
            "connect_timeout_s": 5.0,
            "poll_interval_s": 0.2,
            "replay_rate": 0,
            "backoff": {"initial_s": 0.1, "max_s": 1.0},
        }
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def _control_socket(state_dir: Path) -> Path:
    """``state_dir/ctl.sock``, or a short private directory under /tmp when that path is too
    long for a Unix socket (108 bytes on Linux; deep temporary directories exceed it)."""
    path = state_dir / "ctl.sock"
    if len(str(path).encode()) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="cabinet-ctl-", dir="/tmp")) / "ctl.sock"


def cmd_topic(artefacts: AgentArtefacts, kind: str, prefix: str = "cabinets/v1") -> str:
    """The agent's MQTT command topic for a document ``kind`` (allow-list, asset-registry)."""
    return f"{prefix}/{artefacts.site_id}/{artefacts.cabinet_id}/cmd/{kind}"


def publish_retained(
    port: int, topic: str, payload: bytes, *, host: str = "127.0.0.1", timeout: float = 15.0
) -> None:
    """Publish one retained QoS 1 message and wait for the broker's acknowledgement (blocking)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from backend.subscriber import stop_client

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout=timeout)
        if not info.is_published():
            raise ScenarioError(f"the broker did not acknowledge {topic} in {timeout:g}s")
    finally:
        stop_client(client)


def publish_documents(artefacts: AgentArtefacts, *, port: int, host: str = "127.0.0.1") -> None:
    """Deliver the signed allow-list and (unless the scenario has none) the asset registry as
    retained cmd messages."""
    publish_retained(port, cmd_topic(artefacts, "allow-list"), artefacts.allow_list, host=host)
    if artefacts.registry_installed:
        publish_retained(
            port, cmd_topic(artefacts, "asset-registry"), artefacts.asset_registry, host=host
        )
