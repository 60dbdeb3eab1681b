"""Errors have one root and two kinds: transient (retry with backoff) and permanent."""

from __future__ import annotations


class CabinetError(Exception):
    """Root of every error the agent raises on purpose."""


class TransientError(CabinetError):
    """Retry with jittered backoff: timeouts, resets, a busy reader, a bad frame."""


class PermanentError(CabinetError):
    """Report and stop that part: bad configuration, unsupported hardware."""


class ProtocolError(TransientError):
    """The peer sent bytes that break the protocol; the session ends and reconnects."""


class RefusedError(TransientError):
    """The peer refused us (busy, credentials, certificate): retry, but at the longest delay."""


class ReaderBusyError(RefusedError):
    """The reader refused the connection because another client holds it."""
