"""config/agent.example.toml is complete and, with only addresses and paths filled in, delivers."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from agent.config import AgentConfig, load_config
from backend.keys import load_backend_keys
from simulators.badge import BadgeSimulator
from simulators.llrp import LlrpSimulator
from tests.daemon_rig import AgentProcess, provision
from tests.delivery_helpers import Collector
from tests.mqtt_fixtures import BrokerTls, Mosquitto, Pki

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "agent.example.toml"


def _models(annotation: object) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def test_example_names_every_config_key() -> None:
    """Every section and key the agent knows appears in the example (set, or commented out)."""
    text = EXAMPLE.read_text()
    missing: list[str] = []
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            as_key = re.search(rf"^\s*#?\s*{re.escape(name)}\s*=", text, re.M)
            as_table = re.search(rf"^\s*#?\s*\[+[a-z_.]*\b{re.escape(name)}\]+", text, re.M)
            if not (as_key or as_table):
                missing.append(f"{model.__name__}.{name}")
            for sub in _models(info.annotation):
                walk(sub)

    walk(AgentConfig)
    assert missing == [], "document these keys in config/agent.example.toml"
    # Every section of the agent is spelled out, not left to defaults.
    for section in AgentConfig.model_fields:
        assert re.search(rf"^\[+{section}\]+", text, re.M), f"[{section}] missing"


def _set(text: str, section: str, key: str, value: str) -> str:
    """Replace the first ``key = …`` line after the ``[section]`` header."""
    head = re.search(rf"^\[+{re.escape(section)}\]+\s*$", text, re.M)
    assert head is not None, section
    line = re.compile(rf"^{re.escape(key)}\s*=\s*(\"[^\"]*\"|\S+)", re.M)
    m = line.search(text, head.end())
    assert m is not None, f"{section}.{key}"
    return text[: m.start(1)] + value + text[m.end(1) :]


async def test_an_agent_started_from_the_example_delivers(tmp_path: Path) -> None:
    # The backend's side: keys, a private CA, a broker requiring client certificates.
    creds = provision(tmp_path)
    credstore = tmp_path / "credentials"  # what systemd's LoadCredential= would give the unit
    credstore.mkdir(mode=0o700)
    shutil.copy(creds / "site.key", credstore / "site-key")
    shutil.copy(creds / "backend-hpke.pub", credstore / "backend-seal.pub")
    shutil.copy(creds / "signing.pub", credstore / "backend-sign.pub")
    pki = Pki(tmp_path / "pki")
    server_crt, server_key, _ = pki.issue("broker", server=True)
    client_crt, client_key, _ = pki.issue("crib-07", server=False)
    broker = Mosquitto(
        tmp_path / "broker",
        tls=BrokerTls(pki.ca_file, server_crt, server_key, require_certificate=True),
    )
    broker.start()
    backend_crt, backend_key, _ = pki.issue("backend", server=False)
    collector = Collector(
        broker.port,
        load_backend_keys(tmp_path / "backend"),
        extra_opts={
            "host": "localhost",
            "ca_file": pki.ca_file,
            "cert_file": backend_crt,
            "key_file": backend_key,
        },
    )
    try:
        collector.start()
        async with (
            LlrpSimulator(personality="impinj", antennas=4, port=0, seed=5) as llrp,
            BadgeSimulator(transport="tcp") as badge,
        ):
            text = EXAMPLE.read_text()
            # Addresses and paths only: every other value is the example's own.
            text = _set(text, "readers", "port", str(llrp.port))
            text = _set(text, "badge_readers", "url", f'"{badge.url}"')
            text = _set(text, "store", "path", f'"{tmp_path / "state" / "state.db"}"')
            text = _set(text, "mqtt", "host", '"localhost"')
            text = _set(text, "mqtt", "port", str(broker.port))
            text = _set(text, "mqtt.tls", "ca_file", f'"{pki.ca_file}"')
            text = _set(text, "mqtt.tls", "cert_file", f'"{client_crt}"')
            text = _set(text, "mqtt.tls", "key_file", f'"{client_key}"')
            text = _set(text, "control", "socket_path", f'"{tmp_path / "control.sock"}"')
            text = _set(text, "control", "group", '"root"')
            text = _set(text, "metrics", "port", "0")
            cfg_path = tmp_path / "agent.toml"
            cfg_path.write_text(text)
            cfg = load_config(cfg_path)
            assert cfg.mqtt is not None
            assert cfg.mqtt.tls is not None

            agent = AgentProcess(
                cfg_path, tmp_path / "agent.log", env={"CREDENTIALS_DIRECTORY": str(credstore)}
            )
            async with agent:
                await agent.wait_log(r"MQTT connected")
                await badge.wait_for_client()
                # No allow-list yet: the badge is denied, and that denial is an event.
                await badge.present("0A1B2C3D4E")
                assert await asyncio.to_thread(collector.wait_count, 1), agent.text()
            assert await agent.stop() == 0, agent.text()
        events = [json.loads(d.plaintext) for d in collector.events]
        assert [e["type"] for e in events] == ["access.denied"]
        assert events[0]["reason"] == "no allow-list"
        assert "0A1B2C3D4E" not in agent.text()
    finally:
        collector.stop()
        broker.stop()
