"""The cabinet's connections: each reader connects and accepts its configuration, the broker
accepts an MQTT session, the agent holds its subscription to its cmd topics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.cli.diag.check import Check
from agent.config import AgentConfig
from drivers.errors import CabinetError

if TYPE_CHECKING:
    from drivers.types import ReaderHealth

READER_TIMEOUT_S = 10.0

_CHECK_LINK = "check power, cable and address"
# A reader in state "failed" answered and refused what the agent asked of it (a permanent
# error: drivers/supervisor.py); power, cable and address are fine.
_FIX_CONFIG = "fix its configuration and restart the agent"


def reader_advice(state: object) -> str:
    """What a technician should do about a reader that is not online."""
    return _FIX_CONFIG if str(state) == "failed" else _CHECK_LINK


async def check_readers(
    cfg: AgentConfig, status: Mapping[str, Any] | None, timeout_s: float
) -> list[Check]:
    """Each reader connects and accepts its configuration (or: the running daemon says so)."""
    if status is not None:
        states = {r.get("id"): r for r in status.get("readers", [])}
        out = []
        for rc in cfg.readers:
            r = states.get(rc.id)
            if r is None:
                out.append(Check("FAIL", f"reader {rc.id}", "the running agent does not know it"))
            elif r.get("state") in ("online", "inventorying"):
                out.append(Check("PASS", f"reader {rc.id}", f"{r['state']} in the running agent"))
            else:
                out.append(
                    Check(
                        "FAIL",
                        f"reader {rc.id}",
                        f"{r.get('state')} in the running agent ({r.get('detail') or 'no detail'}); "
                        + reader_advice(r.get("state")),
                    )
                )
        return out
    return await _ping_readers(cfg, timeout_s)


class _HealthSink:
    """Collects reader health; tag reads and GPI edges are not needed here."""

    def __init__(self) -> None:

        self.health: dict[str, list[ReaderHealth]] = {}
        self.changed = asyncio.Event()

    async def tag_reads(self, reads: Sequence[object]) -> None:
        return None

    async def reader_health(self, health: ReaderHealth) -> None:
        self.health.setdefault(health.reader_id, []).append(health)
        self.changed.set()

    async def gpi_edge(self, edge: object) -> None:
        return None


async def _ping_readers(cfg: AgentConfig, timeout_s: float) -> list[Check]:
    from drivers.registry import make_reader
    from drivers.types import ReaderState, SystemClock

    sink = _HealthSink()
    drivers = [make_reader(rc, sink, SystemClock()) for rc in cfg.readers]
    verdicts: dict[str, Check] = {}
    started = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run(), name=f"selftest:{d.reader_id}") for d in drivers]
        try:
            deadline = started + timeout_s
            while len(verdicts) < len(drivers) and (left := deadline - time.monotonic()) > 0:
                for d in drivers:
                    if d.reader_id in verdicts:
                        continue
                    for h in sink.health.get(d.reader_id, []):
                        if h.healthy:
                            verdicts[d.reader_id] = Check(
                                "PASS",
                                f"reader {d.reader_id}",
                                f"connected and configured in {time.monotonic() - started:.1f}s",
                            )
                            break
                        if h.state in (ReaderState.OFFLINE, ReaderState.FAILED) and h.session >= 1:
                            verdicts[d.reader_id] = Check(
                                "FAIL",
                                f"reader {d.reader_id}",
                                f"{h.detail or 'offline'}; {reader_advice(h.state)}",
                            )
                            break
                sink.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.2)):
                        await sink.changed.wait()
        finally:
            for t in tasks:
                t.cancel()
    return [
        verdicts.get(
            d.reader_id,
            Check(
                "FAIL",
                f"reader {d.reader_id}",
                f"no answer within {timeout_s:g}s; {_CHECK_LINK}",
            ),
        )
        for d in drivers
    ]


async def check_broker(cfg: AgentConfig, status: Mapping[str, Any] | None = None) -> Check:
    """TCP + TLS (as configured) + MQTT CONNACK, with a throw-away client id and session; with
    the daemon running, its own view (unreachable since when, events waiting) comes first."""
    if cfg.mqtt is None:
        return Check("WARN", "broker", "no [mqtt] section: events stay in the outbox")
    own = await _try_broker(cfg)
    daemon_view = status.get("broker") if status is not None else None
    if not isinstance(daemon_view, Mapping):
        return own
    from agent.cli.control_cmd import broker_line

    assert status is not None
    outbox = status.get("outbox")
    agent_says = broker_line(dict(daemon_view), outbox if isinstance(outbox, dict) else None)
    state = daemon_view.get("state")
    if state == "unreachable":
        return Check("FAIL", "broker", f"agent: broker {agent_says}; from here: {own.reason}")
    if state == "not_acknowledging":
        return Check(
            "FAIL",
            "broker",
            f"agent: broker {agent_says}; from here: {own.reason}; check the broker's log, its "
            "queue and in-flight limits, and that its ACL lets this cabinet publish its events",
        )
    if state == "taken_over":
        return Check(
            "FAIL",
            "broker",
            f"agent: broker {agent_says}; find and stop the other client with client id "
            f"{daemon_view.get('client_id')} (a cloned SD card, a second agent), or give each "
            "cabinet its own site_id/cabinet_id",
        )
    return Check(own.status, "broker", f"{own.reason}; agent: {agent_says}", own.config_problem)


def check_commands(status: Mapping[str, Any] | None) -> Check | None:
    """The running agent's subscription to its cmd topics (None without a daemon or broker):
    a cabinet the broker refuses them can never receive an allow-list."""
    broker = status.get("broker") if status is not None else None
    commands = broker.get("commands") if isinstance(broker, Mapping) else None
    if not isinstance(commands, Mapping):
        return None
    from agent.cli.control_cmd import commands_line

    line = commands_line(dict(commands))
    state = commands.get("state")
    if state == "refused":
        return Check("FAIL", "commands", line)
    if state == "subscribed":
        return Check("PASS", "commands", line)
    return Check("WARN", "commands", line)


async def _try_broker(cfg: AgentConfig) -> Check:
    assert cfg.mqtt is not None
    from agent.mqtt.config import check_tls_files
    from agent.mqtt.session import MqttSession, build_tls_context

    # A clean, separate session: never take over (or leave state in) the agent's own.
    mqtt_cfg = cfg.mqtt.model_copy(update={"persistent_session": False})
    where = f"{mqtt_cfg.host}:{mqtt_cfg.effective_port}"
    tls = None
    if mqtt_cfg.tls is not None:
        # What `run` refuses at start (a missing, unsafe or unloadable file) is the operator's
        # configuration: exit 78, the field named.
        try:
            check_tls_files(mqtt_cfg.tls)
            tls = build_tls_context(mqtt_cfg.tls)
        except (CabinetError, OSError, ValueError) as err:
            return Check("FAIL", "broker", f"mqtt.tls: {err}", config_problem=True)
    client_id = f"cabinet-{cfg.cabinet.site_id}-{cfg.cabinet.cabinet_id}-selftest-{os.getpid()}"
    session = MqttSession(mqtt_cfg, client_id, will=None, tls_context=tls)
    try:
        async with asyncio.timeout(mqtt_cfg.connect_timeout_s + 5.0):
            info = await session.connect()
    except CabinetError as err:
        session.abort("selftest")
        return Check("FAIL", "broker", f"{where}: {err}")
    except TimeoutError:
        session.abort("selftest")
        return Check("FAIL", "broker", f"{where}: no CONNACK in time")
    await session.disconnect()
    secure = "TLS" if tls is not None else "plain TCP"
    window = f", receive maximum {info.receive_maximum}" if info.receive_maximum else ""
    return Check("PASS", "broker", f"{where} accepted an MQTT connection ({secure}{window})")
