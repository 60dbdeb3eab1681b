"""A real RabbitMQ cluster on loopback, for the fleet tests and the fleet benchmark.

``RabbitCluster(dir, nodes=3).start()`` starts its own ``epmd`` on a free port and N nodes of
Debian's ``rabbitmq-server`` (the MQTT plugin on, quorum queues for MQTT QoS 1 subscriptions),
each with its own node name, ports (AMQP, MQTT, Erlang distribution), data directory, log
directory and ``RABBITMQ_*`` environment, all sharing an Erlang cookie of their own (in a private
``HOME``). The nodes find each other at boot (``classic_config`` peer discovery), so a cluster
is up in the time one node takes to boot. ``kill(i)`` is SIGKILL of one node, ``start_node(i)``
brings it back on the same ports and data; ``kill_all()`` / ``start_all()`` restart the whole
cluster; ``stop()`` shuts everything down, epmd included. It never touches the package's system
service or its files (``/etc/rabbitmq``, ``/var/lib/rabbitmq``): every path and port is its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from simulators.broker import _die_with_parent, free_port

RABBITMQ_HOME = Path("/usr/lib/rabbitmq")
SERVER = RABBITMQ_HOME / "bin" / "rabbitmq-server"
CTL = RABBITMQ_HOME / "bin" / "rabbitmqctl"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
BOOT_TIMEOUT_S = 120.0  # three nodes booting at once on two shared cores


@dataclass
class RabbitNode:
    """One node: its name, ports and directory (kept across restarts)."""

    index: int
    name: str  # Erlang node name, e.g. fleet3a9c-1@localhost
    dir: Path
    amqp_port: int
    mqtt_port: int
    dist_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / f"{self.name}.log"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"


class RabbitCluster:
    """``with RabbitCluster(dir) as cluster:`` — N clustered nodes, MQTT on each."""

    def __init__(self, dir: Path, nodes: int = 3) -> None:
        if not SERVER.exists():
            raise RuntimeError(
                f"{SERVER} is missing: install Debian's rabbitmq-server "
                "(and keep its system service stopped: the tests start their own nodes)"
            )
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        tag = secrets.token_hex(3)
        self.cookie = secrets.token_hex(16)
        self.home = dir / "home"
        self.home.mkdir(exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        self.epmd_port = free_port()
        self._epmd: subprocess.Popen[bytes] | None = None
        self.nodes = [
            RabbitNode(
                index=i,
                name=f"fleet{tag}-{i}@localhost",
                dir=dir / f"node{i}",
                amqp_port=free_port(),
                mqtt_port=free_port(),
                dist_port=free_port(),
            )
            for i in range(nodes)
        ]
        for node in self.nodes:
            self._write_conf(node)

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.mqtt_port for n in self.nodes]

    @property
    def amqp_urls(self) -> list[str]:
        return [n.amqp_url for n in self.nodes]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """epmd, then every node at once; returns when all run as one cluster."""
        self._start_epmd()
        self.start_all()

    def start_all(self) -> None:
        for node in self.nodes:
            if not node.running:
                self._spawn(node)
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(self._wait_booted, self.nodes))
        self.wait_clustered()

    def start_node(self, i: int) -> None:
        """Bring node ``i`` back (same name, ports and data) and wait until it has rejoined."""
        node = self.nodes[i]
        assert not node.running, f"{node.name} is running"
        self._spawn(node)
        self._wait_booted(node)
        self.wait_clustered()

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (the whole Erlang VM: no clean shutdown)."""
        node = self.nodes[i]
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=30)
        node.proc = None

    def kill_all(self) -> None:
        for i in range(len(self.nodes)):
            self.kill(i)

    def stop(self) -> None:
        """Every node (SIGTERM: a clean stop, SIGKILL after 30 s), then epmd."""
        for node in self.nodes:
            if node.running:
                assert node.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=30)
            node.proc = None
        if self._epmd is not None:
            self._epmd.kill()
            self._epmd.wait(timeout=10)
            self._epmd = None

    # ------------------------------------------------------------------ inspection

    def ctl(self, *args: str, node: int | None = None, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl`` against a running node (the first running one by default)."""
        target = self.nodes[node] if node is not None else self._a_running_node()
        proc = subprocess.run(
            [str(CTL), "-n", target.name, "--erlang-cookie", self.cookie, *args],
            env=self._env(target),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def wait_clustered(self, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        """Until every running node sees every running node."""
        want = {n.name for n in self.nodes if n.running}
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
                running = set(status.get("running_nodes", []))
                if running >= want:
                    return
                last = f"running {sorted(running)}"
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
                last = str(err)
            time.sleep(0.5)
        raise RuntimeError(f"cluster did not form within {timeout_s:g} s: {last}")

    def queues(self) -> list[dict[str, object]]:
        """``list_queues`` (name, type, messages, consumers, members, leader) as dicts."""
        out = self.ctl(
            "list_queues",
            "name",
            "type",
            "messages",
            "consumers",
            "members",
            "leader",
            "--formatter",
            "json",
        )
        rows: list[dict[str, object]] = json.loads(out)
        return rows

    def log_tail(self, i: int, n: int = 40) -> str:
        try:
            lines = self.nodes[i].log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # ------------------------------------------------------------------ helpers

    def _a_running_node(self) -> RabbitNode:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node is running")

    def _start_epmd(self) -> None:
        # Our own name server on our own port: the system's (4369) is never used or started.
        self._epmd = subprocess.Popen(
            [EPMD, "-port", str(self.epmd_port)],
            env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        if not _wait_port(self.epmd_port, 10.0):
            raise RuntimeError("epmd did not start")

    def _write_conf(self, node: RabbitNode) -> None:
        for sub in ("mnesia", "log"):
            (node.dir / sub).mkdir(parents=True, exist_ok=True)
        peers = "\n".join(
            f"cluster_formation.classic_config.nodes.{n.index + 1} = {n.name}" for n in self.nodes
        )
        (node.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}\n"
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{node.mqtt_port}\n"
            # QoS 1 subscriptions (the cabinets' cmd topics and their 3.1.1 echo) on quorum
            # queues: a cabinet may reconnect through any node while one is down.
            "mqtt.durable_queue_type = quorum\n"
            "log.console = false\n"
            "log.file.level = info\n"
            "cluster_formation.peer_discovery_backend = classic_config\n"
            f"{peers}\n"
        )
        (node.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (node.dir / "rabbitmq-env.conf").write_text("")

    def _env(self, node: RabbitNode) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": str(self.home),  # the Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_CONF_ENV_FILE": str(node.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.dir / "log"),
            "RABBITMQ_PID_FILE": str(node.dir / "pid"),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            # Erlang distribution on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _spawn(self, node: RabbitNode) -> None:
        out = (node.dir / "stdout.log").open("ab")
        try:
            node.proc = subprocess.Popen(
                [str(SERVER)],
                env=self._env(node),
                cwd=node.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,  # the VM and its helpers die together (killpg)
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()

    def _wait_booted(self, node: RabbitNode) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if node.proc is None or node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited while booting:\n{self.log_tail(node.index)}"
                )
            if _wait_port(node.mqtt_port, 0.5) and _wait_port(node.amqp_port, 0.5):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{node.name} did not boot:\n{self.log_tail(node.index)}")


def _wait_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
