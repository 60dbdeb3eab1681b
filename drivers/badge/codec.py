"""Sans-IO badge codecs: EM4100 frames (RDM6300-class readers) and line-oriented ASCII readers.

Both turn arbitrary, possibly hostile bytes into :class:`RawBadge` values. A ``RawBadge``
never shows its card number in ``repr``/``str``/f-strings and refuses to be pickled: the
only way to the number is :meth:`RawBadge.reveal`, which the driver calls exactly once, as
the argument of the pseudonymizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn, Protocol

STX = 0x02
ETX = 0x03
EM4100_ID_CHARS = 10
EM4100_FRAME_LEN = 1 + EM4100_ID_CHARS + 2 + 1  # STX, id, checksum, ETX

DEFAULT_LINE_PATTERN = r"^(?P<id>[0-9A-Fa-f]{8,20})$"
DEFAULT_MAX_LINE = 64
MAX_LINE_LIMIT = 1024

_HEX = frozenset(b"0123456789ABCDEFabcdef")
_HEX_TEXT = frozenset("0123456789ABCDEFabcdef")


class RawBadge:
    """A decoded card number that hides itself from logs, reprs, exceptions and pickles."""

    __slots__ = ("_id",)

    def __init__(self, raw_id: str) -> None:
        self._id = raw_id

    def reveal(self) -> str:
        """The canonical card number. Call it only as the pseudonymizer's argument."""
        return self._id

    def __repr__(self) -> str:
        return "RawBadge(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RawBadge):
            return NotImplemented
        return self._id == other._id

    def __hash__(self) -> int:
        return hash((RawBadge, self._id))

    def __reduce__(self) -> NoReturn:
        # Pickling is the easy road to a raw number on disk (multiprocessing, caches).
        raise TypeError("RawBadge values must not be serialized")


@dataclass(slots=True)
class CodecStats:
    """What a codec received and what it threw away (counters only, never content)."""

    frames: int = 0  # valid badge frames / lines decoded
    dropped_bytes: int = 0  # bytes discarded: noise, broken frames, rejected lines
    bad_checksums: int = 0  # EM4100 frames with a well-formed shape but a wrong checksum
    rejected_lines: int = 0  # ASCII lines that did not match the pattern (or were not ASCII)
    overlong_lines: int = 0  # ASCII lines longer than the bound, discarded


class BadgeCodec(Protocol):
    """What the badge driver needs from a codec."""

    @property
    def stats(self) -> CodecStats: ...

    def feed(self, data: bytes) -> list[RawBadge]: ...

    def reset(self) -> None: ...


def em4100_checksum(id_bytes: bytes) -> int:
    """XOR of the five ID bytes."""
    value = 0
    for b in id_bytes:
        value ^= b
    return value


class Em4100Codec:
    """``0x02``, 10 hex ID chars, 2 hex chars (XOR of the 5 ID bytes), ``0x03``.

    Resynchronizes on the next ``0x02`` after any broken byte; the buffer never holds
    more than one partial frame (13 bytes) between calls.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._stats = CodecStats()

    @property
    def stats(self) -> CodecStats:
        return self._stats

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame (new connection); counters are kept."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[RawBadge]:
        """Decode every complete frame in ``data`` (plus what was buffered)."""
        buf = self._buf
        buf += data
        out: list[RawBadge] = []
        pos = 0
        n = len(buf)
        while pos < n:
            start = buf.find(STX, pos)
            if start < 0:
                self._stats.dropped_bytes += n - pos
                pos = n
                break
            self._stats.dropped_bytes += start - pos
            pos = start
            verdict = self._check(buf, start, n)
            if verdict == "partial":
                break
            if verdict == "broken":
                # This STX was noise: drop it alone, the next STX may start a real frame.
                self._stats.dropped_bytes += 1
                pos = start + 1
                continue
            end = start + EM4100_FRAME_LEN
            frame = bytes(buf[start + 1 : end - 1]).upper()
            id_hex = frame[:EM4100_ID_CHARS]
            expected = int(frame[EM4100_ID_CHARS:], 16)
            if em4100_checksum(bytes.fromhex(id_hex.decode("ascii"))) != expected:
                self._stats.bad_checksums += 1
                self._stats.dropped_bytes += EM4100_FRAME_LEN
            else:
                self._stats.frames += 1
                out.append(RawBadge(id_hex.decode("ascii")))
            pos = end
        del buf[:pos]
        return out

    @staticmethod
    def _check(buf: bytearray, start: int, n: int) -> str:
        """'ok', 'partial' (need more bytes) or 'broken' for the frame starting at ``start``."""
        last = min(n, start + EM4100_FRAME_LEN)
        for i in range(start + 1, last):
            offset = i - start
            b = buf[i]
            if offset == EM4100_FRAME_LEN - 1:
                return "ok" if b == ETX else "broken"
            if b not in _HEX:
                return "broken"
        return "partial"

    @staticmethod
    def encode(card_hex: str) -> bytes:
        """One frame for a 10-hex-digit card number (round-trip tests)."""
        card = card_hex.upper()
        if len(card) != EM4100_ID_CHARS or not all(c in "0123456789ABCDEF" for c in card):
            raise ValueError("EM4100 card number must be 10 hex digits")
        checksum = em4100_checksum(bytes.fromhex(card))
        return bytes([STX]) + f"{card}{checksum:02X}".encode("ascii") + bytes([ETX])


def compile_line_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a line pattern; it must have a named group ``id``."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"line pattern does not compile: {err}") from None
    if "id" not in compiled.groupindex:
        raise ValueError("line pattern needs a named group 'id', e.g. (?P<id>[0-9A-F]{10})")
    return compiled


class AsciiLineCodec:
    """One card number per line (CR, LF or CRLF), extracted by a pattern's ``id`` group.

    Lines that do not match are dropped and counted; a line longer than ``max_line`` is
    discarded up to its end, so the buffer never exceeds ``max_line`` bytes.
    """

    def __init__(
        self,
        pattern: str = DEFAULT_LINE_PATTERN,
        max_line: int = DEFAULT_MAX_LINE,
        id_base: int = 16,
    ) -> None:
        if not 1 <= max_line <= MAX_LINE_LIMIT:
            raise ValueError(f"max_line must be 1..{MAX_LINE_LIMIT}")
        if id_base not in (10, 16):
            raise ValueError("id_base must be 10 or 16")
        self._id_base = id_base
        self._pattern = compile_line_pattern(pattern)
        self._max_line = max_line
        self._buf = bytearray()
        self._discarding = False  # inside an overlong line: skip to its end
        self._stats = CodecStats()

    @property
    def stats(self) -> CodecStats:
        return self._stats

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[RawBadge]:
        out: list[RawBadge] = []
        pos = 0
        n = len(data)
        while pos < n:
            end = _find_line_end(data, pos)
            if end < 0:
                self._append(data[pos:])
                break
            self._append(data[pos:end])
            if self._discarding:
                self._discarding = False
            elif self._buf:
                badge = self._parse(bytes(self._buf))
                if badge is not None:
                    out.append(badge)
            self._buf.clear()
            pos = end + 1
        return out

    def _append(self, chunk: bytes) -> None:
        if self._discarding:
            self._stats.dropped_bytes += len(chunk)
            return
        if len(self._buf) + len(chunk) > self._max_line:
            self._stats.overlong_lines += 1
            self._stats.dropped_bytes += len(self._buf) + len(chunk)
            self._buf.clear()
            self._discarding = True
            return
        self._buf += chunk

    def _parse(self, line: bytes) -> RawBadge | None:
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            text = None
        match = self._pattern.search(text) if text else None
        raw_id = match.group("id") if match else None
        if raw_id:
            raw_id = self._canonical(raw_id.strip())
        if not raw_id:
            # A blank line between CR and LF is framing, not a rejected line.
            if text is not None and not text:
                self._stats.dropped_bytes += len(line)
                return None
            self._stats.rejected_lines += 1
            self._stats.dropped_bytes += len(line)
            return None
        self._stats.frames += 1
        return RawBadge(raw_id)

    def _canonical(self, text: str) -> str | None:
        """Upper-case hex, whatever base the reader prints in; None if not a number."""
        if self._id_base == 16:
            return text.upper() if text and all(c in _HEX_TEXT for c in text) else None
        # Keyboard-style readers print the card number in decimal; the pseudonymizer and
        # the EM4100 readers speak hex, so the same card must come out the same.
        if not text.isascii() or not text.isdigit() or len(text) > 40:
            return None
        return format(int(text), "X")

    @staticmethod
    def encode(card: str, line_end: bytes = b"\r\n") -> bytes:
        """One line carrying ``card`` (round-trip tests)."""
        return card.encode("ascii") + line_end


def _find_line_end(data: bytes, pos: int) -> int:
    cr = data.find(b"\r", pos)
    lf = data.find(b"\n", pos)
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(cr, lf)


def make_codec(
    protocol: str,
    pattern: str = DEFAULT_LINE_PATTERN,
    max_line: int = DEFAULT_MAX_LINE,
    id_base: int = 16,
) -> Em4100Codec | AsciiLineCodec:
    """The codec for a configured protocol name."""
    if protocol == "em4100":
        return Em4100Codec()
    if protocol == "ascii-lines":
        return AsciiLineCodec(pattern, max_line, id_base)
    raise ValueError(f"unknown badge protocol {protocol!r}")
