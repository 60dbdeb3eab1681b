"""cabinet-consumer: the reference backend for sealed cabinet events (docs/delivery.md).

Sub-commands:
  consume           subscribe, open envelopes, record each event once (SQLite or PostgreSQL),
                    report seq gaps and refusals, print JSON lines
  holdings          who holds which item since when (--missing, --all)
  history           item events of an item, a pseudonym or a cabinet
  alerts            open alerts, items missing, calibration overdue (--ack EVENT_ID)
  gaps, refused     seqs missing from the record; messages it refused
  keygen DIR        generate backend key material (HPKE, signing, site pseudonym key)
  sign-allow-list   signed allow-list document from a JSON/TOML list of pseudonyms and roles
  sign-registry     signed asset-registry document from a JSON/TOML list of assets
  sign-erasure      signed erasure document from a JSON/TOML list of pseudonyms
  site-key FILE     a new site key (the next key of a rotation; Argon2id cost chosen here)
  pseudonym         a badge's pseudonym from the site key (raw id read from stdin, never printed)
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.mqtt.config import DEFAULT_MAX_COMMAND_BYTES
from agent.privacy.envelope import EnvelopeError, EnvelopeHeader, Opener
from agent.privacy.keys import HPKE_PRIVATE_FILE, SIGNING_PRIVATE_FILE, SITE_KEY_FILE
from agent.privacy.pseudonym import ARGON2_BOUNDS, KeyFileError, Pseudonymizer, load_site_key
from agent.privacy.signed import parse_time
from backend.amqp import DEFAULT_QUEUE, AmqpRecordingConsumer, check_amqp_url
from backend.anchors import AnchorBook
from backend.keys import (
    P2_DEFAULT,
    Argon2Params,
    generate_backend_keys,
    generate_site_key,
    load_hpke_private,
    load_signing_private,
)
from backend.record import RecordUnavailable
from backend.record import queries as record_queries
from backend.record.cli import add_db_options, add_record_commands, open_from_args
from backend.record.consume import RecordingConsumer
from backend.record.recorder import Admitted, Outcome, Recorder
from backend.signing import allow_list_doc, asset_registry_doc, erasure_doc, sign_document
from backend.subscriber import DEFAULT_TOPIC, ConsumerOptions, MqttSubscriber, check_transport

__all__ = [
    "Consumer",
    "ConsumerOptions",
    "Delivered",
    "EventDecoder",
    "SeqTracker",
    "load_opener",
]

logger = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY_S = 86_400
DEFAULT_DEDUP_CAPACITY = 1_000_000
MAX_OUT_OF_ORDER = 100_000  # seqs held above a gap before the gap is declared lost
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69


# ---------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Delivered:
    """One opened, first-seen event."""

    site: str
    cabinet: str
    header: EnvelopeHeader
    plaintext: bytes

    def to_json(self) -> dict[str, Any]:
        try:
            event: Any = json.loads(self.plaintext)
        except (UnicodeDecodeError, json.JSONDecodeError):
            event = {"base64": base64.b64encode(self.plaintext).decode("ascii")}
        return {
            "site": self.site,
            "cabinet": self.cabinet,
            "epoch": None if self.header.epoch is None else self.header.epoch.hex(),
            "seq": self.header.seq,
            "event_id": str(self.header.event_id),
            "key_id": self.header.key_id,
            "event": event,
        }


@dataclass
class SeqTracker:
    """Per-cabinet sequence bookkeeping: everything ``<= low`` was seen; ``above`` are islands."""

    low: int
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> tuple[int, int] | None:
        """Record ``seq``; return the (first, last) missing range if it opens a new gap."""
        if seq <= self.low or seq in self.above:
            return None
        top = max(self.above) if self.above else self.low
        self.above.add(seq)
        while self.low + 1 in self.above:
            self.low += 1
            self.above.discard(self.low)
        if seq > top + 1:
            return (top + 1, seq - 1)
        return None

    def missing(self, limit: int = 100) -> list[tuple[int, int]]:
        """Missing ranges between ``low`` and the highest seq seen."""
        out: list[tuple[int, int]] = []
        prev = self.low
        for s in sorted(self.above):
            if s > prev + 1:
                out.append((prev + 1, s - 1))
                if len(out) >= limit:
                    break
            prev = s
        return out

    def abandon_oldest_gap(self) -> tuple[int, int] | None:
        """Give up on the lowest gap (bounds memory); return it."""
        gaps = self.missing(1)
        if not gaps:
            return None
        first, last = gaps[0]
        self.low = last
        while self.low + 1 in self.above:
            self.low += 1
            self.above.discard(self.low)
        return first, last


@dataclass
class DecoderStats:
    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    invalid: int = 0
    gaps_opened: int = 0
    seq_conflicts: int = 0  # one (cabinet, epoch, seq) seen with two event ids: a broken cabinet
    anchor_problems: int = 0  # audit anchors that do not extend the previous one (rewritten)


class EventDecoder:
    """Opens envelopes, drops duplicates by event id (bounded memory), tracks seq gaps.

    Sequence bookkeeping is per ``(cabinet, epoch)`` (docs/envelope.md §7): a new epoch's jump
    ahead is not a gap, and a seq that comes back under the same epoch with another event id is
    counted in ``stats.seq_conflicts`` and logged (both events are still delivered).
    """

    def __init__(
        self,
        opener: Opener,
        *,
        dedup_capacity: int = DEFAULT_DEDUP_CAPACITY,
        on_gap: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self._opener = opener
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._by_seq: OrderedDict[tuple[str, bytes, int], bytes] = OrderedDict()
        self._capacity = dedup_capacity
        self._trackers: dict[str, SeqTracker] = {}
        self._on_gap = on_gap
        self.stats = DecoderStats()
        self.anchors = AnchorBook()

    def handle(self, topic: str, payload: bytes) -> Delivered | None:
        """The opened event, or None for a duplicate; EnvelopeError for anything invalid."""
        self.stats.received += 1
        try:
            site, cabinet = _topic_ids(topic)
            header, plaintext = self._opener.open(payload)
            if header.cabinet_id != cabinet:
                raise EnvelopeError(
                    f"envelope of cabinet {header.cabinet_id!r} arrived on {cabinet!r}'s topic"
                )
            _check_body(header, plaintext, site)
        except EnvelopeError:
            self.stats.invalid += 1
            raise
        key = header.event_id.bytes
        if key in self._seen:
            self.stats.duplicates += 1
            return None
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        stream = f"{site}/{cabinet}" + ("" if header.epoch is None else f"@{header.epoch.hex()}")
        slot = (stream, header.epoch or b"", header.seq)
        other = self._by_seq.get(slot)
        if other is not None and other != key:
            self.stats.seq_conflicts += 1
            logger.error(
                "%s: seq %d carries two event ids (%s, %s): the cabinet reused a sequence number",
                stream,
                header.seq,
                uuid.UUID(bytes=other),
                header.event_id,
            )
        else:
            self._by_seq[slot] = key
            if len(self._by_seq) > self._capacity:
                self._by_seq.popitem(last=False)
            self._track(stream, header.seq)
        self.stats.delivered += 1
        self._check_anchor(f"{site}/{cabinet}", plaintext)
        return Delivered(site, cabinet, header, plaintext)

    def _check_anchor(self, cabinet: str, plaintext: bytes) -> None:
        """An ``audit.anchor`` must extend the cabinet's previous one (docs/privacy.md §9)."""
        if b'"audit.anchor"' not in plaintext:
            return
        try:
            event = json.loads(plaintext)
            if event.get("type") != "audit.anchor":
                return
            problems = self.anchors.check(cabinet, event)
        except (ValueError, KeyError, TypeError) as err:
            problems = [f"unreadable audit anchor ({type(err).__name__})"]
        for problem in problems:
            self.stats.anchor_problems += 1
            logger.error("%s: %s", cabinet, problem)

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Outstanding missing seq ranges per ``site/cabinet`` (``site/cabinet@epoch`` from
        version 2 envelopes)."""
        return {k: t.missing() for k, t in self._trackers.items() if t.above}

    def _track(self, cabinet: str, seq: int) -> None:
        tracker = self._trackers.get(cabinet)
        if tracker is None:
            # First sight: earlier seqs may have gone to a previous consumer run.
            self._trackers[cabinet] = SeqTracker(low=seq)
            return
        gap = tracker.add(seq)
        if gap is not None:
            self.stats.gaps_opened += 1
            if self._on_gap is not None:
                self._on_gap(cabinet, *gap)
        if len(tracker.above) > MAX_OUT_OF_ORDER:
            lost = tracker.abandon_oldest_gap()
            if lost is not None:
                logger.error("%s: seqs %d..%d given up as lost", cabinet, lost[0], lost[1])


def _topic_ids(topic: str) -> tuple[str, str]:
    parts = topic.split("/")
    if len(parts) != 5 or parts[4] != "events":
        raise EnvelopeError(f"unexpected topic shape {topic!r}")
    return parts[2], parts[3]


def _check_body(header: EnvelopeHeader, plaintext: bytes, site: str) -> None:
    """The event's own ids must equal the (authenticated) header's and the topic's."""
    try:
        body = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(body, dict):
        return
    if "event_id" in body and str(body["event_id"]) != str(header.event_id):
        raise EnvelopeError(f"seq {header.seq}: event_id in the body differs from the header")
    if "seq" in body and body["seq"] != header.seq:
        raise EnvelopeError(f"seq {header.seq}: seq in the body differs from the header")
    if "cabinet_id" in body and body["cabinet_id"] != header.cabinet_id:
        raise EnvelopeError(f"seq {header.seq}: cabinet_id in the body differs from the header")
    if "site_id" in body and body["site_id"] != site:
        raise EnvelopeError(f"seq {header.seq}: site_id in the body differs from the topic")


# ---------------------------------------------------------------------- network


class Consumer(MqttSubscriber):
    """A paho subscriber (its own network thread) feeding an EventDecoder (in memory: no
    record; the test rigs and the demo's live view)."""

    def __init__(
        self,
        opts: ConsumerOptions,
        decoder: EventDecoder,
        on_event: Callable[[Delivered], None],
    ) -> None:
        super().__init__(opts)
        self.decoder = decoder
        self._on_event = on_event
        self._lock = threading.Lock()

    def __enter__(self) -> Consumer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            try:
                delivered = self.decoder.handle(msg.topic, bytes(msg.payload))
            except EnvelopeError as err:
                logger.warning("dropped an invalid message on %s: %s", msg.topic, err)
                return
            if delivered is not None:
                self._on_event(delivered)


# ---------------------------------------------------------------------- CLI


def load_opener(files: Iterable[Path]) -> Opener:
    """An ``Opener`` for the backend's HPKE private key files (more than one across a key
    rotation: each envelope names its key id)."""
    keys: dict[str, X25519PrivateKey] = {}
    for f in files:
        kid, key = load_hpke_private(f)
        keys[kid] = key
    return Opener(keys)


def _cmd_consume(args: argparse.Namespace) -> int:
    files = list(args.hpke_key or [])
    if args.keys is not None:
        files.insert(0, args.keys / HPKE_PRIVATE_FILE)
    if not files:
        print("consume: give --keys DIR or --hpke-key FILE", file=sys.stderr)
        return EX_USAGE
    if args.share and not args.client_id:
        # Without a stable id and a persistent session, the broker drops what it had sent this
        # member but not yet had acknowledged when it dies: events lost for the whole group.
        print(
            "consume: --share needs --client-id (a persistent session per member)",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        opener = load_opener(files)
    except (KeyFileError, OSError, ValueError) as err:
        print(f"consume: {err}", file=sys.stderr)
        return EX_NOINPUT
    client_id = args.client_id or f"cabinet-consumer-{uuid.uuid4().hex[:12]}"
    expiry = args.session_expiry
    if expiry is None:
        expiry = DEFAULT_SESSION_EXPIRY_S if args.client_id else 0
    opts = ConsumerOptions(
        host=args.host,
        port=args.port or (8883 if args.tls_ca else 1883),
        topic=args.topic,
        share_group=args.share,
        client_id=client_id,
        session_expiry_s=expiry,
        protocol=args.protocol,
        ca_file=args.tls_ca,
        cert_file=args.cert,
        key_file=args.key,
        allow_plaintext=args.allow_plaintext,
    )
    try:
        check_transport(opts)
        for url in args.amqp or []:
            check_amqp_url(url, allow_plaintext=args.allow_plaintext)
    except ValueError as err:
        print(f"consume: {err}", file=sys.stderr)
        return EX_USAGE
    db = open_from_args(args, "consume")
    if isinstance(db, int):
        return db
    out: IO[str] | None = None
    if not args.quiet:
        out = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    count = 0
    done = threading.Event()

    def on_outcome(outcome: Outcome) -> None:
        nonlocal count
        for stream, first, last in outcome.gaps_opened:
            _stderr_json({"type": "gap", "cabinet": stream, "first": first, "last": last})
        if outcome.status == "refused":
            _stderr_json({"type": "refused", "reason": outcome.reason})
        if outcome.status != "recorded" or outcome.admitted is None:
            return
        for problem in outcome.anchor_problems:  # docs/privacy.md §9
            cabinet = f"{outcome.admitted.site}/{outcome.admitted.cabinet}"
            _stderr_json({"type": "audit-anchor", "cabinet": cabinet, "problem": problem})
        if out is not None:
            out.write(json.dumps(_event_line(outcome.admitted), separators=(",", ":")) + "\n")
            out.flush()
        count += 1
        if args.max_events and count >= args.max_events:
            done.set()

    consumer: RecordingConsumer | AmqpRecordingConsumer
    if args.amqp:
        # A RabbitMQ cluster: competing consumers on one replicated queue (backend/amqp.py).
        consumer = AmqpRecordingConsumer(
            args.amqp,
            args.queue,
            args.topic,
            Recorder(db, opener, client_id),
            stop=done,
            on_outcome=on_outcome,
            name=client_id,
        )
    else:
        consumer = RecordingConsumer(
            opts, Recorder(db, opener, client_id), stop=done, on_outcome=on_outcome
        )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    consumer.start()
    told_subscribed = False
    try:
        while not done.wait(0.2):
            if not told_subscribed and consumer.subscribed.is_set():
                # From here on nothing published is missed: scripts (and tests) wait for it.
                told_subscribed = True
                _stderr_json({"type": "subscribed", "client_id": client_id})
            idle = time.monotonic() - consumer.last_message
            if args.idle_exit and consumer.subscribed.is_set() and idle >= args.idle_exit:
                break
    finally:
        done.set()  # a message being retried gives up (unacknowledged) so the thread can end
        consumer.stop()
        if out is not None and out is not sys.stdout:
            out.close()
    try:
        open_gaps = record_queries.gaps(db)
    except RecordUnavailable:
        open_gaps = []
    finally:
        db.close()
    summary = {
        "type": "summary",
        "client_id": client_id,
        **vars(consumer.stats),
        "open_gaps": [
            {k: g[k] for k in ("site_id", "cabinet_id", "epoch", "first_seq", "last_seq")}
            for g in open_gaps[:100]
        ],
    }
    _stderr_json(summary)
    return 0


def _event_line(a: Admitted) -> dict[str, Any]:
    return {
        "site": a.site,
        "cabinet": a.cabinet,
        "epoch": a.epoch or None,
        "seq": a.header.seq,
        "event_id": str(a.header.event_id),
        "key_id": a.header.key_id,
        "event": json.loads(a.plaintext),
    }


def _stderr_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), file=sys.stderr, flush=True)


def _cmd_keygen(args: argparse.Namespace) -> int:
    out: Path = args.dir
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"keygen: {out} is not empty (use --force to add keys anyway)", file=sys.stderr)
        return EX_USAGE
    keys = generate_backend_keys(
        out, hpke_kid=args.hpke_kid, signing_kid=args.signing_kid, site_kid=args.site_kid
    )
    print(
        f"wrote backend keys to {out}: HPKE key id {keys.hpke_kid}, signing key id "
        f"{keys.signing_kid}, site key id {keys.site_kid}. Give cabinets only "
        "backend-hpke.pub, signing.pub and site.key."
    )
    return 0


def _load_input(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    if path.suffix.lower() == ".toml":
        data: Any = tomllib.loads(raw.decode("utf-8"))
    else:
        data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("input must be a table/object")
    return data


def _expiry(data: dict[str, Any]) -> datetime:
    if "expires" in data:
        return parse_time(str(data["expires"]))
    days = float(data.get("expires_days", 30))
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def _entries(data: dict[str, Any]) -> dict[str, list[str]]:
    raw = data.get("entries", {})
    if isinstance(raw, dict):
        return {str(k): list(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return {str(e["pseudonym"]): list(e.get("roles", [])) for e in raw}
    raise ValueError("entries must map pseudonym -> roles, or be a list of {pseudonym, roles}")


def _write_doc(args: argparse.Namespace, wire: bytes) -> None:
    if args.out is None:
        sys.stdout.write(wire.decode("utf-8") + "\n")
    else:
        args.out.write_bytes(wire)


def _cmd_sign(args: argparse.Namespace, kind: str) -> int:
    try:
        data = _load_input(args.input)
        kid, key = load_signing_private(args.keys / SIGNING_PRIVATE_FILE)
        common = (str(data["site"]), str(data.get("cabinet", "*")), int(data["version"]))
        if kind == "allow-list":
            doc = allow_list_doc(*common, _expiry(data), _entries(data))
        elif kind == "erasure":
            raw = data["pseudonyms"]
            if not isinstance(raw, list):
                raise ValueError("pseudonyms must be a list")
            doc = erasure_doc(*common, _expiry(data), [str(p) for p in raw])
        else:
            doc = asset_registry_doc(*common, _expiry(data), list(data.get("assets", [])))
        wire = sign_document(key, kid, doc)
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError, KeyFileError) as err:
        print(f"sign-{kind}: {err}", file=sys.stderr)
        return EX_DATAERR
    if len(wire) > args.max_bytes:
        # The broker drops (MQTT 5) or the cabinet refuses anything above the cabinet's
        # [mqtt] max_command_bytes: the old document would silently stay until it expires.
        print(
            f"sign-{kind}: the signed document is {len(wire)} bytes, above --max-bytes "
            f"{args.max_bytes} (the cabinets' [mqtt] max_command_bytes): raise that on the "
            "cabinets and the broker's message size limit first, then pass --max-bytes",
            file=sys.stderr,
        )
        return EX_DATAERR
    _write_doc(args, wire)
    return 0


def _cmd_site_key(args: argparse.Namespace) -> int:
    out: Path = args.file
    if out.exists() and not args.force:
        print(f"site-key: {out} exists (use --force to replace it)", file=sys.stderr)
        return EX_USAGE
    scheme = "p1" if args.p1 else args.scheme
    try:
        argon2 = (
            None
            if scheme == "p1"
            else Argon2Params(
                memory_kib=args.memory_kib, iterations=args.iterations, lanes=args.lanes
            )
        )
        site = generate_site_key(out, args.kid, argon2, tpm=scheme == "p3")
    except (OSError, ValueError) as err:
        print(f"site-key: {err}", file=sys.stderr)
        return EX_USAGE
    also = (
        "; wrap it for each cabinet's TPM (cabinet-consumer tpm-wrap, docs/privacy.md §5)"
        if site.tpm
        else ""
    )
    print(
        f"wrote site key {site.kid} ({site.scheme}) to {out}: list every person under both "
        f"keys while the cabinets change over (docs/privacy.md, rotation){also}"
    )
    return 0


def _cmd_tpm_wrap(args: argparse.Namespace) -> int:
    """The site key's p3 HMAC key, wrapped for one cabinet's TPM (its storage key)."""
    from agent.privacy.enrolment import (
        read_storage_key,
        wrap_for_cabinet,
        write_site_key_import,
    )
    from agent.privacy.tpm import TpmError

    out: Path = args.out
    if out.exists() and not args.force:
        print(f"tpm-wrap: {out} exists (use --force to replace it)", file=sys.stderr)
        return EX_USAGE
    try:
        site = load_site_key(args.site_key)
        storage_key = read_storage_key(args.storage_key)
        imp = wrap_for_cabinet(args.site, site, storage_key)
    except (KeyFileError, TpmError, ValueError) as err:
        print(f"tpm-wrap: {err}", file=sys.stderr)
        return EX_DATAERR
    write_site_key_import(out, imp)
    print(
        f"wrote site key {imp.prefix} of site {imp.site_id}, wrapped for the TPM of "
        f"{args.storage_key}, to {out}: on that cabinet, cabinetctl tpm import {out.name}"
    )
    return 0


def _cmd_pseudonym(args: argparse.Namespace) -> int:
    key_files: list[Path] = args.site_key or ([args.keys / SITE_KEY_FILE] if args.keys else [])
    if not key_files:
        print("pseudonym: give --site-key FILE or --keys DIR", file=sys.stderr)
        return EX_USAGE
    try:
        pseudonymizers = [Pseudonymizer.from_key_file(args.site, f) for f in key_files]
    except (KeyFileError, ValueError) as err:
        print(f"pseudonym: {err}", file=sys.stderr)
        return EX_NOINPUT
    if sys.stdin.isatty():
        print("badge id (one per line, Ctrl-D to end):", file=sys.stderr)
    rc = 0
    for n, line in enumerate(_stdin_lines(), start=1):
        if not line.strip():
            continue
        try:
            print(" ".join(p.badge(line) for p in pseudonymizers))
        except ValueError as err:
            # The message never contains the input (canonical_badge_id guarantees it).
            print(f"pseudonym: line {n}: {err}", file=sys.stderr)
            rc = EX_DATAERR
    return rc


def _stdin_lines() -> Iterator[str]:
    for line in sys.stdin:
        yield line.rstrip("\r\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cabinet-consumer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "consume", help="receive, open, record (once) and print events (docs/backend.md)"
    )
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=None, help="default 8883 with TLS, else 1883")
    c.add_argument("--topic", default=DEFAULT_TOPIC)
    c.add_argument(
        "--share", metavar="GROUP", help="MQTT v5 shared subscription group (needs --client-id)"
    )
    c.add_argument("--client-id", help="stable id: the broker keeps this consumer's session")
    c.add_argument(
        "--session-expiry",
        type=int,
        default=None,
        help="seconds the broker keeps our session while we are away (default "
        f"{DEFAULT_SESSION_EXPIRY_S} with --client-id, else 0)",
    )
    c.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    c.add_argument("--keys", type=Path, help=f"backend key dir (reads {HPKE_PRIVATE_FILE})")
    c.add_argument(
        "--hpke-key", type=Path, action="append", help="extra HPKE private key file (rotation)"
    )
    c.add_argument("--tls-ca", type=Path)
    c.add_argument("--cert", type=Path)
    c.add_argument("--key", type=Path)
    c.add_argument("--allow-plaintext", action="store_true")
    add_db_options(c)
    c.add_argument("--out", type=Path, help="append JSON lines to this file (default stdout)")
    c.add_argument("--quiet", action="store_true", help="record only, print no event lines")
    c.add_argument(
        "--amqp",
        action="append",
        metavar="URL",
        help="read the fleet's replicated queue on a RabbitMQ cluster instead of subscribing "
        "over MQTT (amqp://user:pass@host:5672/vhost; repeat for each node: the next one is "
        "tried when one is lost); consumers on one queue share it",
    )
    c.add_argument(
        "--queue",
        default=DEFAULT_QUEUE,
        help=f"the quorum queue bound to --topic (with --amqp; default {DEFAULT_QUEUE})",
    )
    c.add_argument("--max-events", type=int, default=0, help="exit after N new events")
    c.add_argument("--idle-exit", type=float, default=0, help="exit after S idle seconds")
    c.set_defaults(func=_cmd_consume)

    k = sub.add_parser("keygen", help="generate backend key material into DIR")
    k.add_argument("dir", type=Path)
    k.add_argument("--hpke-kid", default="hpke1")
    k.add_argument("--signing-kid", default="sig1")
    k.add_argument("--site-kid", default="s1")
    k.add_argument("--force", action="store_true")
    k.set_defaults(func=_cmd_keygen)

    for name, kind, what in (
        ("sign-allow-list", "allow-list", "pseudonyms and roles"),
        ("sign-registry", "asset-registry", "assets (epc + attributes)"),
        ("sign-erasure", "erasure", "pseudonyms to erase (after an allow-list without them)"),
    ):
        s = sub.add_parser(name, help=f"sign a {kind} document from JSON/TOML {what}")
        s.add_argument("input", type=Path, help="site, cabinet, version, expires, entries/assets")
        s.add_argument("--keys", type=Path, required=True, help="backend key dir (signing.key)")
        s.add_argument("--out", type=Path, help="write here (default stdout)")
        s.add_argument(
            "--max-bytes",
            type=int,
            default=DEFAULT_MAX_COMMAND_BYTES,
            help="refuse a larger document (the cabinets' [mqtt] max_command_bytes; "
            f"default {DEFAULT_MAX_COMMAND_BYTES})",
        )
        s.set_defaults(func=lambda a, kind=kind: _cmd_sign(a, kind))

    sk = sub.add_parser("site-key", help="write a new site key FILE (0600)")
    sk.add_argument("file", type=Path)
    sk.add_argument("--kid", required=True, help="its key id (new: pseudonyms name it)")
    for name, default in (
        ("memory_kib", P2_DEFAULT.memory_kib),
        ("iterations", P2_DEFAULT.iterations),
        ("lanes", P2_DEFAULT.lanes),
    ):
        low, high = ARGON2_BOUNDS[name]
        sk.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=default,
            help=f"Argon2id {name} ({low}..{high}, default {default})",
        )
    sk.add_argument(
        "--scheme",
        choices=["p2", "p3"],
        default="p2",
        help="p2: the cabinets hold the key file; p3: they hold it in a TPM (docs/privacy.md §5)",
    )
    sk.add_argument("--p1", action="store_true", help="a legacy HMAC (p1) key: tests only")
    sk.add_argument("--force", action="store_true")
    sk.set_defaults(func=_cmd_site_key)

    tw = sub.add_parser(
        "tpm-wrap", help="wrap a p3 site key for one cabinet's TPM (cabinetctl tpm import)"
    )
    tw.add_argument("--site-key", type=Path, required=True, help="the p3 site key file")
    tw.add_argument("--site", required=True, help="the site id the key serves")
    tw.add_argument(
        "--storage-key",
        type=Path,
        required=True,
        help="the cabinet's TPM storage key (cabinetctl tpm storage-key)",
    )
    tw.add_argument("-o", "--out", type=Path, required=True)
    tw.add_argument("--force", action="store_true")
    tw.set_defaults(func=_cmd_tpm_wrap)

    p = sub.add_parser("pseudonym", help="pseudonym of a badge id read from stdin")
    p.add_argument("--site", required=True)
    p.add_argument(
        "--site-key",
        type=Path,
        action="append",
        help="site key file; twice (old, new) prints both pseudonyms of each badge on one line",
    )
    p.add_argument("--keys", type=Path, help="backend key dir (site.key)")
    p.set_defaults(func=_cmd_pseudonym)

    add_record_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("CABINET_CONSUMER_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
