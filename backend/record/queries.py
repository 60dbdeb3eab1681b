"""Reading the record through its views (the same queries a maintenance system would run)."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

from backend.record.db import RecordDb, Tx
from backend.record.recorder import iso

__all__ = ["ack_alert", "alerts", "gaps", "history", "holdings", "refused"]

Row = dict[str, Any]
_JSON_COLUMNS = frozenset({"holders", "actors", "flagged_holders", "body"})


def holdings(
    db: RecordDb, *, item: str | None = None, state: str = "out", site: str | None = None
) -> list[Row]:
    """Items out (``state='out'``: who holds them since when), missing, or all of them;
    ``item`` is an asset id or an EPC."""
    where, params = _filters(item=item, site=site)
    if state == "out":
        view = "holdings"
    elif state == "missing":
        view = "items_missing"
    else:
        view = "items"
    order = "ORDER BY site_id, asset_id, epc"
    return _rows(db, f"SELECT * FROM {view}{where} {order}", params)  # noqa: S608 (fixed names)


def history(
    db: RecordDb,
    *,
    item: str | None = None,
    actor: str | None = None,
    cabinet: str | None = None,
    site: str | None = None,
    limit: int = 50,
) -> list[Row]:
    """Item events, newest first: of one item, one pseudonym, one cabinet, or all."""
    where, params = _filters(item=item, site=site, cabinet=cabinet)
    if actor is not None:
        clause = f"{db.dialect.json_text('actors')} LIKE ? ESCAPE '\\'"
        where = f"{where} AND {clause}" if where else f" WHERE {clause}"
        escaped = actor.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params.append(f'%"{escaped}"%')
    sql = f"SELECT * FROM item_history{where} ORDER BY time DESC, seq DESC, cabinet_id, event_id LIMIT ?"  # noqa: S608
    return _rows(db, sql, [*params, limit])


def alerts(db: RecordDb, *, site: str | None = None) -> dict[str, list[Row]]:
    """What needs attention: open alerts, items missing, items flagged overdue for calibration."""
    where, params = _filters(site=site)
    found: dict[str, list[Row]] = {}
    for view, order in (
        ("open_alerts", "raised_at, seq"),
        ("items_missing", "since"),
        ("calibration_overdue", "calibration_due"),
    ):
        found[view] = _rows(db, f"SELECT * FROM {view}{where} ORDER BY {order}", params)  # noqa: S608
    return found


def ack_alert(db: RecordDb, event_id: str, now: datetime) -> int:
    """Acknowledge an alert by the id of the event that raised it; rows changed (0 or 1)."""

    def ack(tx: Tx) -> int:
        return tx.execute(
            "UPDATE alert_raised SET acked_at = ? WHERE event_id = ? AND acked_at IS NULL",
            (iso(now), event_id),
        )

    return db.transaction(ack)


def gaps(db: RecordDb) -> list[Row]:
    """Open seq gaps per cabinet and epoch."""
    return _rows(db, "SELECT * FROM seq_gaps ORDER BY site_id, cabinet_id, epoch, first_seq")


def anchor_problems(db: RecordDb) -> list[Row]:
    """Audit anchors that did not extend their cabinet's previous one (docs/privacy.md §9)."""
    return _rows(
        db, "SELECT * FROM audit_anchor_problems ORDER BY site_id, cabinet_id, seq, problem"
    )


def refused(db: RecordDb, *, limit: int = 50) -> list[Row]:
    """Refused messages, newest first."""
    return _rows(db, "SELECT * FROM refused_events ORDER BY refused_at DESC LIMIT ?", [limit])


def _filters(
    *, item: str | None = None, site: str | None = None, cabinet: str | None = None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if item is not None:
        # An event may not carry the asset id (the registry did not know it then): by EPC too.
        clauses.append(
            "(asset_id = ? OR epc = ? OR epc IN (SELECT epc FROM items WHERE asset_id = ?))"
        )
        params += [item, item.lower(), item]
    if site is not None:
        clauses.append("site_id = ?")
        params.append(site)
    if cabinet is not None:
        clauses.append("cabinet_id = ?")
        params.append(cabinet)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rows(db: RecordDb, sql: str, params: list[Any] | None = None) -> list[Row]:
    names, rows = db.query(sql, params or [])
    return [{n: _plain(n, v) for n, v in zip(names, row, strict=True)} for row in rows]


def _plain(name: str, value: Any) -> Any:
    """One value as JSON would carry it, whichever database it came from."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, memoryview | bytes):
        return bytes(value).hex()
    if name in _JSON_COLUMNS and isinstance(value, str):
        return json.loads(value)
    return value
