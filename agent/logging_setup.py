"""Structured logging to stdout, one event per line: journald (or a terminal) picks it up.

``text`` is for people, ``json`` for log shippers (one object per line: time, level, logger, msg,
then any ``extra=`` fields). Under systemd (JOURNAL_STREAM names our stdout) each line starts with
a ``<N>`` syslog priority, which journald strips and turns into the entry's priority, so
``journalctl -p warning`` works; the timestamp is left to journald then.

No regex redaction of "things that look like badge ids": raw ids are kept out of logs by
construction (drivers pseudonymize at decode time; ``RawBadge`` prints as ``<redacted>``). A
hex-run mask cannot be precise here: EPCs, event ids and key fingerprints are long hex runs we need
in logs, while an EM4100 number is just 10 hex digits and ASCII readers may send decimal ids. It
would garble diagnostics and still promise a guarantee it cannot keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

# Third-party loggers that are chatty below WARNING (sllurp narrates every LLRP state change at
# INFO). Capped whatever the configured level, so DEBUG means *our* debug output.
NOISY_LOGGERS: dict[str, int] = {
    "sllurp": logging.WARNING,
    "paho": logging.WARNING,
    "asyncio": logging.WARNING,
}

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# Every attribute a plain LogRecord has; anything else on a record came from ``extra=``.
# The cabinet a line is about when one process drives several (agent/controller.py runs each
# cabinet's task tree in a context where this is set); None: the process, or its only cabinet.
CABINET: ContextVar[str | None] = ContextVar("cabinet", default=None)


@contextlib.contextmanager
def cabinet_context(cabinet: str | None) -> Iterator[None]:
    """Log lines (and tasks started) inside this block name ``cabinet``."""
    token = CABINET.set(cabinet)
    try:
        yield
    finally:
        CABINET.reset(token)


_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "task",
}


def setup_logging(
    level: str | int = "INFO",
    fmt: LogFormat = "text",
    *,
    stream: TextIO | None = None,
    journal: bool | None = None,
) -> logging.Handler:
    """Send all logs to ``stream`` (stdout) in ``fmt``; safe to call again on reload.

    ``journal=None`` detects journald from JOURNAL_STREAM. Returns the installed handler.
    """
    out = stream if stream is not None else sys.stdout
    if journal is None:
        journal = stream_is_journal(out)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    formatter: logging.Formatter = (
        JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)
    )
    handler.setFormatter(formatter)
    handler.addFilter(_TaskNameFilter())
    root = logging.getLogger()
    # Replace only the handler a previous call installed; leave anyone else's alone.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for name, cap in NOISY_LOGGERS.items():
        noisy = logging.getLogger(name)
        noisy.setLevel(max(cap, root.level))
    return handler


def stream_is_journal(stream: TextIO) -> bool:
    """True if ``stream`` is the journald stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class TextFormatter(logging.Formatter):
    """``2026-11-29T21:24:18.123Z INFO    agent.x: message key=value`` on one line."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.journal:
            parts.append(_iso_time(record.created))
        parts.append(f"{record.levelname:<7} {record.name}: {_visible(record.getMessage())}")
        for key, value in extra_fields(record).items():
            parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        details = _exception_text(record)
        if details:
            line = f"{line} | {details}"
        # One event per line: journald would otherwise split a traceback into many entries.
        line = line.replace("\r", "").replace("\n", "\\n")
        return _prefix(record, line) if self.journal else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, task, extra fields, exc."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": _visible(record.getMessage()),
        }
        task = getattr(record, "task", None)
        if task:
            data["task"] = task
        for key, value in extra_fields(record).items():
            data.setdefault(key, value)
        details = _exception_text(record)
        if details:
            data["exc"] = details
        line = json.dumps(data, default=str, ensure_ascii=False, separators=(",", ":"))
        return _prefix(record, line) if self.journal else line


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def printable(text: object, limit: int = 200) -> str:
    """``text`` from outside (a topic, a broker's reason string), safe for one log or status line.

    Control and format characters (NUL, ESC, newlines, bidi overrides, lone surrogates) become
    visible escapes (``\\x00``, ``\\u202e``), so a hostile peer can neither forge log lines nor
    drive a technician's terminal; more than ``limit`` characters are cut (with a count).
    """
    s = str(text)
    cut = len(s) - limit if limit > 0 and len(s) > limit else 0
    if cut:
        s = s[:limit]
    out = "".join(_escape(c) if _unsafe(c) else c for c in s)
    return f"{out}…(+{cut} chars)" if cut else out


class ThrottledLog:
    """One line per key and interval: repeats are counted and summed up in one line.

    The first occurrence of a key is logged at once; repeats within ``interval_s`` are only
    counted, and when the interval ends (or at ``close()``) one line reports the last of them
    with the count (``… (repeated 4711 time(s) in the last 10 s)``). So a peer flooding us
    with the same failure costs a line per interval, not a line per message. Counters for
    status and metrics are the caller's: this only decides what reaches the log. Used on the
    event loop (the summary is scheduled with ``call_later``); without a running loop the
    summary waits for the key's next occurrence.
    """

    MAX_KEYS = 256

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.interval_s = interval_s
        self._clock = clock
        # key -> [window start, repeats not yet logged, level, msg, args]
        self._keys: dict[Hashable, list[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> None:
        """Log ``msg % args`` now, or count it as a repeat of ``key`` within the interval."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            entry[2:] = [level, msg, args]
            self._schedule(entry[0] + self.interval_s - now)
            return
        if entry is not None and entry[1]:
            self._summary(entry)
        self._logger.log(level, msg, *args)
        if len(self._keys) >= self.MAX_KEYS and key not in self._keys:
            self._prune(now)
        self._keys[key] = [now, 0, level, msg, args]

    def flush(self) -> None:
        """Log the summary of every key whose interval is over (the timer calls this)."""
        self._timer = None
        now = self._clock()
        pending = False
        for entry in self._keys.values():
            if not entry[1]:
                continue
            if now - entry[0] >= self.interval_s:
                self._summary(entry)
                entry[0], entry[1] = now, 0
            else:
                pending = True
        if pending:
            self._schedule(self.interval_s)

    def close(self) -> None:
        """Log what is still counted and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self._keys.values():
            if entry[1]:
                self._summary(entry)
                entry[1] = 0

    def _summary(self, entry: list[Any]) -> None:
        start, count, level, msg, args = entry
        summary = f"{msg} (repeated %d time(s) in the last %.0f s)"
        self._logger.log(level, summary, *args, count, self._clock() - start)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, delay), self.flush)

    def _prune(self, now: float) -> None:
        for key, entry in list(self._keys.items()):
            if now - entry[0] >= self.interval_s:
                if entry[1]:
                    self._summary(entry)
                del self._keys[key]
        while len(self._keys) >= self.MAX_KEYS:  # all recent: forget the oldest
            oldest = min(self._keys, key=lambda k: self._keys[k][0])
            entry = self._keys.pop(oldest)
            if entry[1]:
                self._summary(entry)


# -- private -----------------------------------------------------------------------------------

# Unicode categories a line must never carry raw: controls, format (bidi overrides, zero-width),
# line/paragraph separators, surrogates (unencodable), private use.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co"})


def _unsafe(c: str) -> bool:
    return (c < " " or c >= "\x7f") and unicodedata.category(c) in _UNSAFE_CATEGORIES


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n <= 0xFF else f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def _visible(message: str) -> str:
    """A log message with control characters escaped, except newlines and tabs (a formatter
    keeps those its own way: escaped in text, JSON-escaped in JSON)."""
    if message.isprintable():
        return message
    return "".join(_escape(c) if c not in "\n\t" and _unsafe(c) else c for c in message)


_HANDLER_NAME = "cabinet-agent-stdout"


class _TaskNameFilter(logging.Filter):
    """Adds the running asyncio task's name (every task is named, so this says who logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop in this thread
            task = None
        record.task = task.get_name() if task is not None else None
        cabinet = CABINET.get()
        if cabinet is not None and not hasattr(record, "cabinet"):
            record.cabinet = cabinet  # shown as an extra field: cabinet=crib-a
        return True


def _iso_time(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _exception_text(record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info and record.exc_info[0] is not None:
        parts.append("".join(traceback.format_exception(*record.exc_info)).rstrip())
    elif record.exc_text:
        parts.append(record.exc_text.rstrip())
    if record.stack_info:
        parts.append(record.stack_info.rstrip())
    return "\n".join(parts)


def _prefix(record: logging.LogRecord, line: str) -> str:
    priority = _SYSLOG_PRIORITY.get(record.levelno)
    if priority is None:
        # Custom levels: the nearest standard one at or below.
        below = [lvl for lvl in _SYSLOG_PRIORITY if lvl <= record.levelno]
        priority = _SYSLOG_PRIORITY[max(below)] if below else 7
    return f"<{priority}>{line}"
