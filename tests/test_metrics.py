"""Metrics: scraped over real HTTP on loopback and parsed with the Prometheus text parser."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.config import parse_config
from agent.metrics import Metrics, MetricsConfig, MetricsServer, MetricsServerError
from drivers.types import ReaderState

WAIT_S = 10.0


async def _http_get(port: int, path: str = "/metrics") -> tuple[int, dict[str, str], str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT_S)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), headers, body.decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _exercise(m: Metrics) -> None:
    m.tag_reads("r1", 1, 5)
    m.tag_reads("r1", 2)
    m.tag_reads("r1", 1, 2)
    m.reader_state("r1", ReaderState.CONNECTING)
    m.reader_state("r1", ReaderState.INVENTORYING)
    m.reader_reconnect("r1")
    m.door_cycle()
    m.door_cycle("incomplete")
    m.event("item.checked_out", 3)
    m.event("door.opened")
    m.outbox(depth=12, size_bytes=4096, oldest_age_s=7.5)
    m.published(0.02)
    m.published(3.0)
    m.mqtt_reconnect()
    m.dropped("age_limit", 2)


async def test_scrape_over_http_and_parse() -> None:
    metrics = Metrics()
    _exercise(metrics)
    server = MetricsServer(MetricsConfig(port=0), metrics.registry)
    await server.start()
    try:
        assert server.port
        status, headers, body = await _http_get(server.port)
    finally:
        await server.stop()
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    s = _samples(body)
    assert s[("cabinet_tag_reads_total", (("antenna", "1"), ("reader", "r1")))] == 7
    assert s[("cabinet_tag_reads_total", (("antenna", "2"), ("reader", "r1")))] == 1
    assert (
        s[("cabinet_reader_state", (("cabinet_reader_state", "inventorying"), ("reader", "r1")))]
        == 1
    )
    assert (
        s[("cabinet_reader_state", (("cabinet_reader_state", "connecting"), ("reader", "r1")))] == 0
    )
    assert s[("cabinet_reader_reconnects_total", (("reader", "r1"),))] == 1
    assert s[("cabinet_door_cycles_total", (("outcome", "complete"),))] == 1
    assert s[("cabinet_door_cycles_total", (("outcome", "incomplete"),))] == 1
    assert s[("cabinet_events_total", (("type", "item.checked_out"),))] == 3
    assert s[("cabinet_outbox_depth", ())] == 12
    assert s[("cabinet_outbox_bytes", ())] == 4096
    assert s[("cabinet_outbox_oldest_age_seconds", ())] == 7.5
    assert s[("cabinet_publish_latency_seconds_count", ())] == 2
    assert s[("cabinet_publish_latency_seconds_bucket", (("le", "0.025"),))] == 1
    assert s[("cabinet_publish_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[("cabinet_mqtt_reconnects_total", ())] == 1
    assert s[("cabinet_events_dropped_total", (("reason", "age_limit"),))] == 2
    assert s[("cabinet_agent_info", (("version", __version__),))] == 1
    # Our own registry: the library's global one is untouched.
    assert REGISTRY.get_sample_value("cabinet_mqtt_reconnects_total") is None


async def test_render_matches_what_is_served() -> None:
    metrics = Metrics()
    metrics.event("door.opened")
    async_server = MetricsServer(MetricsConfig(port=0), metrics.registry)
    await async_server.start()
    try:
        assert async_server.port is not None
        _, _, body = await _http_get(async_server.port)
    finally:
        await async_server.stop()
    assert _samples(body) == _samples(metrics.render().decode())


async def test_server_binds_loopback_only_and_stops_cleanly() -> None:
    server = MetricsServer(MetricsConfig(port=0), Metrics().registry)
    await server.start()
    port = server.port
    assert port is not None
    assert server._httpd is not None
    assert server._httpd.server_address[0] == "127.0.0.1"
    await server.stop()
    assert server.port is None
    # The port is released: connecting now is refused. (The thread guard checks the thread.)
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT_S)
    await server.stop()  # idempotent


async def test_an_unscraped_server_keeps_no_thread_waiting() -> None:
    """The listening socket is watched by the loop: no thread wakes to poll for a scrape, and
    the one a scrape gets ends with it."""
    before = set(threading.enumerate())
    server = MetricsServer(MetricsConfig(port=0), Metrics().registry)
    await server.start()
    try:
        assert set(threading.enumerate()) == before
        assert server.port is not None
        status, _, body = await _http_get(server.port)
        assert status == 200
        assert "cabinet_agent" in body
    finally:
        await server.stop()


async def test_disabled_serves_nothing() -> None:
    server = MetricsServer(MetricsConfig(enabled=False), Metrics().registry)
    await server.start()
    assert server.port is None
    await server.stop()


async def test_port_in_use_is_a_clear_error_and_serve_survives_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        server = MetricsServer(MetricsConfig(port=port), Metrics().registry)
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port} unavailable"):
            await server.start()
        stop = asyncio.Event()
        task = asyncio.create_task(server.serve(stop), name="metrics")
        await asyncio.wait_for(server.started.wait(), WAIT_S)
        assert server.port is None
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    finally:
        blocker.close()
    assert "running without metrics" in caplog.text


async def test_serve_until_stop_event() -> None:
    metrics = Metrics()
    cfg = MetricsConfig(port=0)
    server = MetricsServer(cfg, metrics.registry)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop), name="metrics")
    await asyncio.wait_for(server.started.wait(), WAIT_S)
    assert server.port is not None
    status, _, _ = await _http_get(server.port)
    assert status == 200
    stop.set()
    await asyncio.wait_for(task, WAIT_S)
    assert server.port is None


def test_metrics_config_section() -> None:
    base: dict[str, Any] = {
        "cabinet": {"site_id": "s1", "cabinet_id": "c1"},
        "readers": [{"type": "llrp", "id": "r1", "host": "127.0.0.1"}],
    }
    cfg = parse_config(base)
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.metrics.enabled is True
    with pytest.raises(ValueError):
        MetricsConfig(host="0.0.0.0")  # type: ignore[arg-type]


async def test_each_scrape_samples_the_parts_on_the_loop_first() -> None:
    """Metrics at scrape time: the refresh runs on the event loop before each scrape is
    rendered, so each scrape sees what happened up to it (and nothing samples in between)."""
    metrics = Metrics()
    loop = asyncio.get_running_loop()
    part = {"reads": 0, "depth": 0}
    seen = {"reads": 0}
    threads: list[bool] = []

    async def refresh() -> None:
        threads.append(asyncio.get_running_loop() is loop)
        await asyncio.sleep(0)  # it may await (Store.stats() does)
        metrics.tag_reads("r1", 1, part["reads"] - seen["reads"])
        seen["reads"] = part["reads"]
        metrics.outbox(part["depth"], 0, 0.0)

    server = MetricsServer(MetricsConfig(port=0), metrics.registry, refresh)
    await server.start()
    try:
        assert server.port
        part.update(reads=5, depth=3)
        first = _samples((await _http_get(server.port))[2])
        part.update(reads=12, depth=0)
        second = _samples((await _http_get(server.port))[2])
    finally:
        await server.stop()
    key = ("cabinet_tag_reads_total", (("antenna", "1"), ("reader", "r1")))
    assert (first[key], second[key]) == (5, 12)  # counted once each: deltas, not totals
    assert first[("cabinet_outbox_depth", ())] == 3
    assert second[("cabinet_outbox_depth", ())] == 0
    assert threads == [True, True]


async def test_a_scrape_that_stops_waiting_cancels_its_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scrape serves the last sample when the parts were not sampled in time; the sample it
    asked for is then cancelled, not left running behind it (scrapes of a wedged outbox read
    would otherwise queue one sample each behind the sampling lock)."""
    import agent.metrics

    monkeypatch.setattr(agent.metrics, "SCRAPE_REFRESH_TIMEOUT_S", 0.05)
    metrics = Metrics()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def refresh() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # an outbox read that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = MetricsServer(MetricsConfig(port=0), metrics.registry, refresh)
    await server.start()
    try:
        assert server.port
        status, _, _ = await _http_get(server.port)
        assert started.is_set()
        assert status == 200  # served, with the last sample
        async with asyncio.timeout(10):
            await cancelled.wait()
    finally:
        await server.stop()
