"""``cabinet-consumer holdings|history|alerts|gaps|refused``: the record, read through its views.

Tables for people, ``--json`` (one JSON document) for scripts. Pseudonyms are printed as they
are: mapping them to people is the customer's directory, outside the product.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from backend.record import DSN_ENV, RecordDb, RecordUnavailable, SchemaTooNew, open_record
from backend.record import queries as q

__all__ = ["add_db_options", "add_record_commands", "open_from_args"]

EX_USAGE = 64
EX_UNAVAILABLE = 69
# Columns shown in the tables (--json has them all).
_HOLDINGS_COLUMNS = ("asset_id", "epc", "holders", "since", "cabinet_id", "drawer")
_ITEMS_COLUMNS = ("asset_id", "epc", "state", "holders", "since", "cabinet_id", "drawer")
_MISSING_COLUMNS = ("asset_id", "epc", "cabinet_id", "drawer", "since")
_HISTORY_COLUMNS = ("time", "type", "asset_id", "epc", "actors", "cabinet_id", "drawer")
_ALERT_COLUMNS = ("raised_at", "cabinet_id", "type", "detail", "event_id")
_CALIBRATION_COLUMNS = ("asset_id", "epc", "calibration_due", "flagged_at", "state", "holders")
_GAP_COLUMNS = ("site_id", "cabinet_id", "epoch", "first_seq", "last_seq", "missing", "opened_at")
_REFUSED_COLUMNS = ("refused_at", "topic", "cabinet_id", "seq", "reason")


def add_db_options(p: argparse.ArgumentParser) -> None:
    """``--db PATH`` (SQLite) or ``--dsn DSN`` (PostgreSQL)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--db",
        type=Path,
        help="SQLite record file (default $CABINET_RECORD_DB, else ./cabinet-record.db)",
    )
    g.add_argument(
        "--dsn",
        help=f"PostgreSQL record, a libpq DSN or URL (default ${DSN_ENV}; keep passwords there "
        "or in ~/.pgpass, not on the command line)",
    )


def open_from_args(args: argparse.Namespace, prog: str) -> RecordDb | int:
    """The record, or an exit code after saying why not."""
    try:
        return open_record(args.db, args.dsn)
    except (RecordUnavailable, SchemaTooNew) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE


def add_record_commands(sub: Any) -> None:
    """Register the read commands on the ``cabinet-consumer`` sub-parser set."""
    h = sub.add_parser(
        "holdings", help="who holds which item since when (or --missing, --all items)"
    )
    h.add_argument("--item", help="an asset id (TW-0001) or an EPC")
    h.add_argument("--site")
    which = h.add_mutually_exclusive_group()
    which.add_argument("--missing", action="store_true", help="items reported missing")
    which.add_argument("--all", action="store_true", help="every item: in, out or missing")
    h.add_argument("--json", action="store_true")
    add_db_options(h)
    h.set_defaults(func=_with_record(_holdings))

    hi = sub.add_parser("history", help="item events, newest first")
    hi.add_argument("item", nargs="?", help="an asset id or an EPC (default: every item)")
    hi.add_argument("--actor", help="only events of this badge pseudonym")
    hi.add_argument("--cabinet")
    hi.add_argument("--site")
    hi.add_argument("-n", "--limit", type=int, default=50)
    hi.add_argument("--json", action="store_true")
    add_db_options(hi)
    hi.set_defaults(func=_with_record(_history))

    a = sub.add_parser(
        "alerts", help="open alerts, items missing, items checked out with calibration overdue"
    )
    a.add_argument("--site")
    a.add_argument("--ack", metavar="EVENT_ID", help="acknowledge the alert raised by this event")
    a.add_argument("--json", action="store_true")
    add_db_options(a)
    a.set_defaults(func=_with_record(_alerts))

    g = sub.add_parser("gaps", help="seqs missing from the record, per cabinet and epoch")
    g.add_argument("--json", action="store_true")
    add_db_options(g)
    g.set_defaults(func=_with_record(_gaps))

    r = sub.add_parser("refused", help="messages the record refused, with the reason")
    r.add_argument("-n", "--limit", type=int, default=50)
    r.add_argument("--json", action="store_true")
    add_db_options(r)
    r.set_defaults(func=_with_record(_refused))


def _with_record(
    body: Callable[[argparse.Namespace, RecordDb], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        db = open_from_args(args, f"cabinet-consumer {args.command}")
        if isinstance(db, int):
            return db
        try:
            return body(args, db)
        except RecordUnavailable as err:
            print(f"cabinet-consumer {args.command}: {err}", file=sys.stderr)
            return EX_UNAVAILABLE
        finally:
            db.close()

    return run


def _holdings(args: argparse.Namespace, db: RecordDb) -> int:
    state = "missing" if args.missing else "all" if args.all else "out"
    rows = q.holdings(db, item=args.item, state=state, site=args.site)
    if args.json:
        _print_json(rows)
    else:
        columns = {"out": _HOLDINGS_COLUMNS, "missing": _MISSING_COLUMNS}.get(state, _ITEMS_COLUMNS)
        title = {"out": "items out", "missing": "items missing"}.get(state, "items")
        _print_table(title, columns, rows)
    return 0


def _history(args: argparse.Namespace, db: RecordDb) -> int:
    if args.limit < 1:
        print("cabinet-consumer history: --limit must be at least 1", file=sys.stderr)
        return EX_USAGE
    rows = q.history(
        db,
        item=args.item,
        actor=args.actor,
        cabinet=args.cabinet,
        site=args.site,
        limit=args.limit,
    )
    if args.json:
        _print_json(rows)
    else:
        _print_table("item history (newest first)", _HISTORY_COLUMNS, rows)
    return 0


def _alerts(args: argparse.Namespace, db: RecordDb) -> int:
    if args.ack is not None:
        changed = q.ack_alert(db, args.ack, datetime.now(UTC))
        if not changed:
            print(
                f"cabinet-consumer alerts: no unacknowledged alert raised by {args.ack}",
                file=sys.stderr,
            )
            return EX_USAGE
    found = q.alerts(db, site=args.site)
    if args.json:
        _print_json(found)
    else:
        _print_table("open alerts", _ALERT_COLUMNS, found["open_alerts"])
        _print_table("items missing", _MISSING_COLUMNS, found["items_missing"])
        _print_table(
            "checked out with calibration overdue",
            _CALIBRATION_COLUMNS,
            found["calibration_overdue"],
        )
    return 0


def _gaps(args: argparse.Namespace, db: RecordDb) -> int:
    rows = q.gaps(db)
    if args.json:
        _print_json(rows)
    else:
        _print_table("seq gaps", _GAP_COLUMNS, rows)
    return 0


def _refused(args: argparse.Namespace, db: RecordDb) -> int:
    rows = q.refused(db, limit=max(1, args.limit))
    if args.json:
        _print_json(rows)
    else:
        _print_table("refused messages (newest first)", _REFUSED_COLUMNS, rows)
    return 0


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _print_table(title: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    # Piped into a file or another program: wide enough that no pseudonym is cut.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 400)
    if not rows:
        console.print(f"{title}: none")
        return
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
