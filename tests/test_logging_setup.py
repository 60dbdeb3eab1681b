"""Structured logging: one event per line, JSON fields, journald priorities, noisy loggers capped."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logging_setup import (
    NOISY_LOGGERS,
    ThrottledLog,
    printable,
    setup_logging,
    stream_is_journal,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved_level = root.level
    saved_handlers = list(root.handlers)
    saved_noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in saved_handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved_level)
        for name, level in saved_noisy.items():
            logging.getLogger(name).setLevel(level)


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_json_lines_carry_fields_and_extras() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", "json", stream=buf, journal=False)
    log = logging.getLogger("agent.test")
    log.info(
        "reader %s online", "r1", extra={"reader": "r1", "antennas": [1, 2], "obj": Path("/x")}
    )
    log.debug("two\nlines")
    first, second = (json.loads(line) for line in _lines(buf))
    assert first["level"] == "INFO"
    assert first["logger"] == "agent.test"
    assert first["msg"] == "reader r1 online"
    assert first["reader"] == "r1"
    assert first["antennas"] == [1, 2]
    assert first["obj"] == "/x"  # not JSON-native: stringified, never a crash
    assert first["time"].endswith("Z")
    assert first["time"][:4].isdigit()
    assert second["msg"] == "two\nlines"  # escaped inside the JSON string, still one line


def test_exceptions_stay_on_one_line_in_both_formats() -> None:
    for fmt in ("json", "text"):
        buf = io.StringIO()
        setup_logging("INFO", fmt, stream=buf, journal=False)
        try:
            raise ValueError("bad frame")
        except ValueError:
            logging.getLogger("agent.test").exception("decode failed")
        [line] = _lines(buf)
        if fmt == "json":
            data = json.loads(line)
            assert data["msg"] == "decode failed"
            assert "ValueError: bad frame" in data["exc"]
            assert "Traceback" in data["exc"]
        else:
            assert "ERROR   agent.test: decode failed | Traceback" in line
            assert "ValueError: bad frame" in line


def test_text_format_with_extras_and_timestamp() -> None:
    buf = io.StringIO()
    setup_logging("INFO", "text", stream=buf, journal=False)
    logging.getLogger("agent.pub").warning(
        "outbox deep", extra={"depth": 1200, "note": "two words"}
    )
    [line] = _lines(buf)
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z")
    assert stamp[10] == "T"
    assert rest == 'WARNING agent.pub: outbox deep depth=1200 note="two words"'


def test_journal_mode_prefixes_priority_and_drops_timestamp() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", "text", stream=buf, journal=True)
    log = logging.getLogger("agent.j")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert _lines(buf) == [
        "<7>DEBUG   agent.j: d",
        "<6>INFO    agent.j: i",
        "<4>WARNING agent.j: w",
        "<3>ERROR   agent.j: e",
        "<2>CRITICAL agent.j: c",
    ]
    buf2 = io.StringIO()
    setup_logging("INFO", "json", stream=buf2, journal=True)
    log.warning("w")
    [line] = _lines(buf2)
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["msg"] == "w"


def test_journal_detection_matches_the_stream_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal_file = tmp_path / "journal"
    other_file = tmp_path / "other"
    with journal_file.open("w") as journal, other_file.open("w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(journal)
        assert not stream_is_journal(other)
        assert not stream_is_journal(io.StringIO())
        setup_logging("INFO", "text", stream=journal)
        logging.getLogger("agent.j").info("hello")
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stream_is_journal(journal)
    assert journal_file.read_text() == "<6>INFO    agent.j: hello\n"


def test_noisy_third_party_loggers_are_capped() -> None:
    buf = io.StringIO()
    setup_logging("DEBUG", "text", stream=buf, journal=True)
    logging.getLogger("sllurp.llrp").info("state change: INVENTORYING")
    logging.getLogger("paho.mqtt.client").debug("Sending PINGREQ")
    logging.getLogger("sllurp.llrp").warning("reader said no")
    logging.getLogger("agent.llrp").debug("our own debug")
    assert _lines(buf) == [
        "<4>WARNING sllurp.llrp: reader said no",
        "<7>DEBUG   agent.llrp: our own debug",
    ]


def test_level_filters_and_reconfiguring_replaces_the_handler() -> None:
    buf1, buf2 = io.StringIO(), io.StringIO()
    setup_logging("WARNING", "text", stream=buf1, journal=True)
    logging.getLogger("agent.x").info("hidden")
    setup_logging("INFO", "json", stream=buf2, journal=False)  # e.g. on SIGHUP
    logging.getLogger("agent.x").info("shown")
    assert buf1.getvalue() == ""
    assert [json.loads(line)["msg"] for line in _lines(buf2)] == ["shown"]
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "cabinet-agent-stdout"]
    assert len(ours) == 1


async def test_json_names_the_asyncio_task() -> None:
    buf = io.StringIO()
    setup_logging("INFO", "json", stream=buf, journal=False)

    async def work() -> None:
        logging.getLogger("agent.t").info("in task")

    await asyncio.create_task(work(), name="reader:r1")
    logging.getLogger("agent.t").info("outside", extra={"reader": "r1"})
    first, second = (json.loads(line) for line in _lines(buf))
    assert first["task"] == "reader:r1"
    assert second.get("task") != "reader:r1"


HOSTILE = "topic\x00\x1b[2J\u202egnp.exe\u2028FAKE\x7f\x85"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_control_characters_from_outside_never_reach_a_line_raw(fmt: str) -> None:
    """Whatever a peer put in a string (NUL, ESC, bidi override, line separators, C1), a log
    line carries it as a visible escape: no forged lines, no terminal tricks."""
    buf = io.StringIO()
    setup_logging("INFO", fmt, stream=buf, journal=False)  # type: ignore[arg-type]
    logging.getLogger("agent.t").warning("message on %s", HOSTILE)
    (line,) = _lines(buf)
    msg = json.loads(line)["msg"] if fmt == "json" else line
    for raw in ("\x00", "\x1b", "\u202e", "\u2028", "\x7f", "\x85"):
        assert raw not in msg
        assert raw not in line
    assert "topic\\x00\\x1b[2J\\u202egnp.exe\\u2028FAKE\\x7f\\x85" in msg


def test_printable_escapes_and_bounds() -> None:
    assert printable("cabinets/v1/a/b/cmd/allow-list") == "cabinets/v1/a/b/cmd/allow-list"
    assert printable("a\nb\tc\x00") == "a\\x0ab\\x09c\\x00"
    assert printable("é ü 🔑") == "é ü 🔑"  # printable text stays as it is
    assert printable("x" * 300, 10) == "x" * 10 + "…(+290 chars)"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate could not even be written


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttled_log_says_a_repeat_once_per_interval_with_a_count() -> None:
    buf = io.StringIO()
    setup_logging("INFO", "text", stream=buf, journal=True)
    clock = _Clock()
    throttle = ThrottledLog(logging.getLogger("agent.t"), 10.0, clock=clock)
    for i in range(1000):
        throttle.log(logging.WARNING, "full", "queue full; dropped %d", i + 1)
    throttle.log(logging.WARNING, "other", "another kind")
    assert _lines(buf) == [
        "<4>WARNING agent.t: queue full; dropped 1",
        "<4>WARNING agent.t: another kind",
    ]
    clock.t += 9.9
    throttle.flush()  # the interval is not over yet
    assert len(_lines(buf)) == 2
    clock.t += 0.1
    throttle.flush()
    assert _lines(buf)[2:] == [
        "<4>WARNING agent.t: queue full; dropped 1000 (repeated 999 time(s) in the last 10 s)"
    ]
    # The flood goes on: one more line per interval; what is left is said at close.
    throttle.log(logging.WARNING, "full", "queue full; dropped %d", 1001)
    clock.t += 3
    throttle.close()
    assert _lines(buf)[3:] == [
        "<4>WARNING agent.t: queue full; dropped 1001 (repeated 1 time(s) in the last 3 s)"
    ]
    # Quiet for an interval: the next one is logged at once.
    clock.t += 60
    throttle.log(logging.WARNING, "full", "queue full; dropped %d", 1002)
    assert _lines(buf)[4:] == ["<4>WARNING agent.t: queue full; dropped 1002"]


def test_throttled_log_keys_are_bounded() -> None:
    buf = io.StringIO()
    setup_logging("INFO", "text", stream=buf, journal=True)
    clock = _Clock()
    throttle = ThrottledLog(logging.getLogger("agent.t"), 10.0, clock=clock)
    for i in range(ThrottledLog.MAX_KEYS * 4):
        throttle.log(logging.WARNING, ("refused", i), "refused %d", i)
    assert len(throttle._keys) <= ThrottledLog.MAX_KEYS
    assert len(_lines(buf)) == ThrottledLog.MAX_KEYS * 4
