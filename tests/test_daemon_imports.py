"""What the daemon loads is what it uses: CLI-only libraries (rich), the reference backend and
the simulators stay out of ``cabinet-agent run``'s import graph, and optional parts (metrics,
TPM, Mercury reader, store quarantine) load only when the configuration asks for them
(docs/performance.md, "A small board")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from simulators.llrp import LlrpSimulator
from simulators.mercury import MercurySimulator
from tests.daemon_rig import AgentProcess, config_text, provision
from tests.mqtt_fixtures import Mosquitto

ROOT = Path(__file__).resolve().parent.parent

# Everything `cabinet-agent run` imports on its way to a running cabinet: the entry point, the
# daemon and, lazily at run time, the publisher and every reader driver.
DAEMON_MODULES = (
    "agent.cli.cabinet_agent",
    "agent.daemon",
    "agent.mqtt.publisher",
    "drivers.llrp.reader",
    "drivers.mercury.reader",
    "drivers.badge.reader",
)
NOT_IN_THE_DAEMON = ("rich", "backend", "simulators", "pytest", "hypothesis")


def test_the_daemon_imports_no_cli_backend_or_simulator_code() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {DAEMON_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    loaded = set(json.loads(out.stdout))
    assert "agent" in loaded
    assert "paho" in loaded  # the probe saw the daemon's real graph
    assert not loaded & set(NOT_IN_THE_DAEMON), sorted(loaded & set(NOT_IN_THE_DAEMON))


# What a daemon configured without them must never load (docs/performance.md, "A small board"):
# the metrics endpoint (prometheus-client and the HTTP server under it), the TPM code, a Mercury
# reader's codec and driver, a damaged store's quarantine, X.509 parsing (SPKI pins over TLS).
OPTIONAL = {
    "spki pins": ("cryptography.x509",),
    "metrics": ("agent.metrics", "prometheus_client", "wsgiref.simple_server", "http.server"),
    "tpm": ("agent.privacy.tpm", "tpm2_pytss"),
    "mercury": ("drivers.mercury.codec", "drivers.mercury.reader"),
    "damaged store": ("agent.store.quarantine",),
}


def _mqtt(broker: Mosquitto) -> str:
    return f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'


async def _daemon_modules(tmp: Path, cfg_text: str, up: tuple[str, ...]) -> dict[str, Any]:
    """Run the real daemon (through tests.imports_probe) until every pattern of ``up`` is in its
    log, stop it with SIGTERM, and return what it had imported."""
    cfg = tmp / "agent.toml"
    cfg.write_text(cfg_text)
    out = tmp / "modules.json"
    agent = AgentProcess(
        cfg, tmp / "agent.log", {"CABINET_TEST_MODULES": str(out)}, module="tests.imports_probe"
    )
    async with agent:
        for pattern in up:
            await agent.wait_log(pattern)
        assert await agent.stop() == 0, agent.text()
    record: dict[str, Any] = json.loads(out.read_text())
    return record


async def test_a_daemon_without_metrics_tpm_or_mercury_never_imports_them(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    provision(tmp_path)
    async with LlrpSimulator(personality="impinj", antennas=4, port=0, seed=7) as sim:
        text = config_text(tmp_path, sim.port, extra=_mqtt(mosquitto))
        text = text.replace("[metrics]\nport = 0", "[metrics]\nenabled = false")
        record = await _daemon_modules(
            tmp_path, text, ("MQTT connected as", r"reader dock-1 configured")
        )
    loaded = set(record["modules"])
    assert {"agent.daemon", "drivers.llrp.reader", "agent.store.salvage", "paho"} <= loaded
    for what, modules in OPTIONAL.items():
        assert not loaded & set(modules), (what, sorted(loaded & set(modules)))
    # Nor did pydantic read every installed distribution's metadata looking for plugins.
    assert record["plugins_scanned"] is False


async def test_a_daemon_configured_for_metrics_and_a_mercury_reader_loads_and_uses_them(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    provision(tmp_path)
    async with MercurySimulator("tcp", antennas=4, seed=3) as merc:
        merc.add_tag("3008" + "0" * 20, 1, rssi_mean=-50.0, rssi_spread=1.0, read_probability=1.0)
        text = config_text(tmp_path, 1, extra=_mqtt(mosquitto))
        text = text.replace(
            'type = "llrp"\nid = "dock-1"\nhost = "127.0.0.1"\nport = 1\n',
            f'type = "mercury"\nid = "dock-1"\nurl = "{merc.url}"\n',
        ).replace("gpi_ports = [1]\n", "")
        record = await _daemon_modules(
            tmp_path,
            text,
            ("MQTT connected as", r"metrics on http://", r"reader dock-1: \S+ -> online"),
        )
    loaded = set(record["modules"])
    assert set(OPTIONAL["metrics"]) <= loaded
    assert set(OPTIONAL["mercury"]) <= loaded
