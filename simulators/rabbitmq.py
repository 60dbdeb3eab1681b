"""A real RabbitMQ cluster on loopback, for the fleet tests and the fleet benchmark.

``RabbitCluster(dir, nodes=3).start()`` starts its own ``epmd`` on a free port and N nodes of
Debian's ``rabbitmq-server`` (the MQTT plugin on, quorum queues for MQTT QoS 1 subscriptions),
each with its own node name, ports (AMQP, MQTT, Erlang distribution), data directory, log
directory and ``RABBITMQ_*`` environment, all sharing an Erlang cookie of their own (in a private
``HOME``). The nodes find each other at boot (``classic_config`` peer discovery), so a cluster
is up in the time one node takes to boot. ``kill(i)`` is SIGKILL of one node, ``start_node(i)``
brings it back on the same ports and data; ``kill_all()`` / ``start_all()`` restart the whole
cluster (restarting each node's MQTT client-id tracker early, as an operator would, see
``RESTART_TRACKER``); ``stop()`` shuts everything down, epmd included. It never touches the package's system
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
# After a whole-cluster restart, each node's MQTT plugin (3.10) asks its peers' client-id
# tracker members (a Raft cluster, ``mqtt_node``) for the membership *before* restarting its
# own member, with a 100 s timeout: the first node to get past that has a member that cannot
# elect a leader alone, and every later node waits the full 100 s on it. Restarting each
# node's member as soon as its Raft system runs gives them a quorum at once; it is what the
# plugin does itself right after that wait, so doing it early is idempotent (docs/decisions.md).
RESTART_TRACKER = "ra:restart_server(coordination, mqtt_node:server_id())."
# Ra keeps which Raft members a node runs in a dets table saved every 500 ms: a quorum queue
# declared less than that before *every* node dies (kill -9) may come back without a quorum
# (seen: a cabinet's subscription queue, declared at its first connect, never elected a leader
# again). ``sync()`` saves it now on every node, so a test's whole-cluster kill tests our side.
SYNC_RAFT_DIRECTORY = (
    "[dets:sync(T) || S <- [quorum_queues, coordination],"
    " #{names := #{directory_rev := T}} <- [ra_system:fetch(S)]]."
)


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
    log_mark: int = 0  # size of the log when this VM was started: what it wrote comes after

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

    def __init__(self, dir: Path, nodes: int = 3, *, extra_conf: str = "") -> None:
        if not SERVER.exists():
            raise RuntimeError(
                f"{SERVER} is missing: install Debian's rabbitmq-server "
                "(and keep its system service stopped: the tests start their own nodes)"
            )
        self.dir = dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra_conf = extra_conf  # more rabbitmq.conf lines, for every node
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
        """epmd, then the nodes one after the other; returns when all run as one cluster whose
        MQTT client-id tracker has every node as a member.

        One after the other, not at once: each node's MQTT plugin (3.10) joins the tracker's
        Raft cluster by asking its leader to add it, and a leader refuses a second membership
        change while one is in progress (``cluster_change_not_permitted``, which the plugin
        logs and ignores). A node started together with another was often left outside the
        tracker for good: every MQTT connection through it timed out ("client ID registration
        timed out"), and with one of the two real members killed the tracker lost its quorum,
        so no node accepted MQTT connections any more.
        """
        self._start_epmd()
        for node in self.nodes:
            self._spawn(node)
            self._wait_booted(node)
        self.wait_clustered()
        self.check_tracker()

    def sync(self) -> None:
        """Save every running node's Raft directory to disk now (``SYNC_RAFT_DIRECTORY``)."""
        running = [n for n in self.nodes if n.running]
        with ThreadPoolExecutor(len(running) or 1) as pool:
            outs = list(
                pool.map(lambda n: self.ctl("eval", SYNC_RAFT_DIRECTORY, node=n.index), running)
            )
        bad = [o for o in outs if o.strip() != "[ok,ok]"]
        if bad:
            raise RuntimeError(f"Raft directory not synced: {bad}")

    def check_tracker(self) -> None:
        """Raise unless every node is a member of the MQTT client-id tracker (``mqtt_node``)."""
        out = self.ctl("eval", "ra:members(mqtt_node:server_id()).")
        missing = [n.name for n in self.nodes if f"'{n.name}'" not in out]
        if missing:
            raise RuntimeError(f"not members of the MQTT client-id tracker: {missing}: {out}")

    def start_all(self, *, restart_tracker: bool = True) -> None:
        """Every node that is down; returns when all run as one cluster, MQTT served.

        ``restart_tracker=False`` leaves the MQTT plugin to itself (a whole-cluster restart
        then takes some 100 s more, see ``RESTART_TRACKER``)."""
        restarting = [n for n in self.nodes if restart_tracker and not n.running and _has_data(n)]
        for node in self.nodes:
            if not node.running:
                self._spawn(node)
        with ThreadPoolExecutor(2 * len(self.nodes)) as pool:
            trackers = [pool.submit(self._restart_tracker, n) for n in restarting]
            list(pool.map(self._wait_booted, self.nodes))
            for t in trackers:
                t.result()
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
            # The first node starts alone (start()): no point in waiting 5 s for peers.
            "cluster_formation.discovery_retry_limit = 2\n"
            f"{peers}\n"
            f"{self.extra_conf}"
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
        try:
            node.log_mark = node.log_file.stat().st_size
        except OSError:
            node.log_mark = 0
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

    def _restart_tracker(self, node: RabbitNode) -> None:
        """``RESTART_TRACKER`` on ``node`` once its Raft system runs (bounded; best effort:
        without it the cluster still comes up, ~100 s later)."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline and node.running:
            if "started MQTT TCP listener" in _read(node.log_file, node.log_mark):
                return  # the plugin got there first
            if "ra system 'coordination' running" in _read(node.log_file, node.log_mark):
                try:
                    out = self.ctl("eval", RESTART_TRACKER, node=node.index, timeout_s=30)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    out = f"({err})"  # the node is not up for the CLI yet
                with (node.dir / "tracker.log").open("a") as log:
                    log.write(f"{time.strftime('%H:%M:%S')} {out.strip()}\n")
                if out.strip() == "ok" or "already_started" in out:
                    return
                # Not yet: the Raft system still loading its members (name_not_registered,
                # system_not_started), or the CLI not in. A node with no member at all gets
                # there by the plugin (its listener starts), or the deadline passes.
            time.sleep(1.0)

    def _wait_booted(self, node: RabbitNode) -> None:
        """Until the node says it has started (its listeners are up): an open port alone may
        be another process's (a node that could not bind it dies soon after)."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if node.proc is None or node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited while booting:\n{self._why(node)}")
            if "Server startup complete" in _read(node.log_file, node.log_mark):
                if _wait_port(node.mqtt_port, 5.0) and _wait_port(node.amqp_port, 5.0):
                    return
                raise RuntimeError(f"{node.name} started without its listeners:\n{self._why(node)}")
            time.sleep(0.2)
        raise RuntimeError(f"{node.name} did not boot:\n{self._why(node)}")

    def _why(self, node: RabbitNode) -> str:
        stdout = _read(node.dir / "stdout.log")[-2000:]
        return f"{self.log_tail(node.index)}\n-- stdout --\n{stdout}"


def _has_data(node: RabbitNode) -> bool:
    return any((node.dir / "mnesia").glob("*/coordination"))


def _read(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


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
