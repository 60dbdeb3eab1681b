"""The record's tables and views, one text for SQLite and PostgreSQL (types from the Dialect).

Tables are the record's own business and may change between versions; the **views** are the
interface for other systems (docs/backend.md): same names and columns on both databases.
Times are UTC instants (``TIMESTAMPTZ`` on PostgreSQL; ISO 8601 text ``…Z`` with microseconds
on SQLite, which sorts as time does), JSON columns are ``JSONB`` / JSON text.
"""

from __future__ import annotations

from backend.record.db import Dialect, RecordDb, Tx

__all__ = ["SCHEMA_VERSION", "VIEWS", "SchemaTooNew", "ensure_schema"]

SCHEMA_VERSION = 1
# Serializes schema creation between consumers starting at once on one PostgreSQL database.
_PG_SCHEMA_LOCK = 0x63616231  # "cab1"


def _tables(d: Dialect) -> list[str]:
    ts, js, big = d.timestamp, d.json, d.bigint
    return [
        "CREATE TABLE IF NOT EXISTS record_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # Every event recorded, once: the event id is the key (delivery is at-least-once).
        f"""CREATE TABLE IF NOT EXISTS event_log (
            event_id TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            seq {big} NOT NULL,
            type TEXT NOT NULL,
            time {ts} NOT NULL,
            clock TEXT NOT NULL,
            key_id TEXT NOT NULL,
            body {js} NOT NULL,
            recorded_at {ts} NOT NULL,
            recorded_by TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS event_log_stream ON event_log (site_id, cabinet_id, epoch, seq)",
        "CREATE INDEX IF NOT EXISTS event_log_type_time ON event_log (type, time)",
        # What could not be recorded, with the reason; the payload stays sealed as it came.
        f"""CREATE TABLE IF NOT EXISTS refused_log (
            digest TEXT PRIMARY KEY,
            topic TEXT NOT NULL,
            site_id TEXT,
            cabinet_id TEXT,
            epoch TEXT,
            seq {big},
            event_id TEXT,
            key_id TEXT,
            reason TEXT NOT NULL,
            payload {d.blob} NOT NULL,
            refused_at {ts} NOT NULL,
            refused_by TEXT NOT NULL)""",
        # Per (cabinet, epoch): the lowest and highest seq recorded, and the holes between.
        f"""CREATE TABLE IF NOT EXISTS seq_stream (
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            low_seq {big} NOT NULL,
            high_seq {big} NOT NULL,
            events {big} NOT NULL,
            conflicts {big} NOT NULL DEFAULT 0,
            first_recorded_at {ts} NOT NULL,
            last_recorded_at {ts} NOT NULL,
            PRIMARY KEY (site_id, cabinet_id, epoch))""",
        f"""CREATE TABLE IF NOT EXISTS seq_gap (
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            first_seq {big} NOT NULL,
            last_seq {big} NOT NULL,
            opened_at {ts} NOT NULL,
            PRIMARY KEY (site_id, cabinet_id, epoch, first_seq))""",
        # Where each item is, from the newest item event (any order of arrival gives the same).
        f"""CREATE TABLE IF NOT EXISTS item_state (
            site_id TEXT NOT NULL,
            epc TEXT NOT NULL,
            asset_id TEXT,
            state TEXT NOT NULL CHECK (state IN ('in', 'out', 'missing')),
            cabinet_id TEXT NOT NULL,
            drawer TEXT,
            holders {js},
            session_id TEXT,
            since {ts} NOT NULL,
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            PRIMARY KEY (site_id, epc))""",
        "CREATE INDEX IF NOT EXISTS item_state_asset ON item_state (asset_id)",
        f"""CREATE TABLE IF NOT EXISTS item_event (
            event_id TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            type TEXT NOT NULL,
            epc TEXT NOT NULL,
            asset_id TEXT,
            drawer TEXT,
            actors {js},
            session_id TEXT)""",
        "CREATE INDEX IF NOT EXISTS item_event_epc ON item_event (site_id, epc, time)",
        "CREATE INDEX IF NOT EXISTS item_event_asset ON item_event (asset_id, time)",
        # Alerts: each raising event, and each event that clears a key (open = raised and not
        # cleared by a later event of the same cabinet, nor acknowledged).
        f"""CREATE TABLE IF NOT EXISTS alert_raised (
            event_id TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            type TEXT NOT NULL,
            alert_key TEXT NOT NULL,
            detail TEXT NOT NULL,
            acked_at {ts})""",
        "CREATE INDEX IF NOT EXISTS alert_raised_key ON alert_raised (site_id, cabinet_id, alert_key, seq)",
        f"""CREATE TABLE IF NOT EXISTS alert_cleared (
            event_id TEXT NOT NULL,
            alert_key TEXT NOT NULL,
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            PRIMARY KEY (event_id, alert_key))""",
        "CREATE INDEX IF NOT EXISTS alert_cleared_key ON alert_cleared (site_id, cabinet_id, alert_key, seq)",
        # Per cabinet: the audit chain's head its newest audit.anchor showed (docs/privacy.md
        # §9), so that the next anchor is judged against it after a consumer restart too;
        # anchor_seq orders anchors (a late, older one is recorded but judges nothing).
        f"""CREATE TABLE IF NOT EXISTS audit_anchor_head (
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            anchor_seq {big} NOT NULL,
            head_seq {big} NOT NULL,
            head_hash TEXT NOT NULL,
            event_id TEXT NOT NULL,
            time {ts} NOT NULL,
            PRIMARY KEY (site_id, cabinet_id))""",
        # What an anchor showed wrong: a chain rewritten or truncated on the device.
        f"""CREATE TABLE IF NOT EXISTS audit_anchor_problem (
            event_id TEXT NOT NULL,
            n INTEGER NOT NULL,
            site_id TEXT NOT NULL,
            cabinet_id TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            problem TEXT NOT NULL,
            PRIMARY KEY (event_id, n))""",
        # The newest "checked out while calibration overdue" per item.
        f"""CREATE TABLE IF NOT EXISTS calibration_flag (
            site_id TEXT NOT NULL,
            epc TEXT NOT NULL,
            asset_id TEXT NOT NULL,
            calibration_due {d.date} NOT NULL,
            cabinet_id TEXT NOT NULL,
            seq {big} NOT NULL,
            time {ts} NOT NULL,
            actors {js},
            event_id TEXT NOT NULL,
            PRIMARY KEY (site_id, epc))""",
    ]


# The documented interface (docs/backend.md). Column lists are the contract.
VIEWS: dict[str, str] = {
    "events": """
        SELECT event_id, site_id, cabinet_id, epoch, seq, type, time, clock, body,
               recorded_at, recorded_by
        FROM event_log""",
    "items": """
        SELECT site_id, asset_id, epc, state, cabinet_id, drawer, holders, session_id, since,
               event_type, event_id
        FROM item_state""",
    "holdings": """
        SELECT site_id, asset_id, epc, holders, since, cabinet_id, drawer, session_id, event_id
        FROM item_state WHERE state = 'out'""",
    "items_missing": """
        SELECT site_id, asset_id, epc, cabinet_id, drawer, since, event_id
        FROM item_state WHERE state = 'missing'""",
    "item_history": """
        SELECT site_id, cabinet_id, asset_id, epc, type, time, actors, drawer, session_id, seq,
               event_id
        FROM item_event""",
    "open_alerts": """
        SELECT a.site_id, a.cabinet_id, a.type, a.alert_key, a.detail, a.time AS raised_at,
               a.seq, a.event_id
        FROM alert_raised a
        WHERE a.acked_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM alert_cleared c
                          WHERE c.site_id = a.site_id AND c.cabinet_id = a.cabinet_id
                            AND c.alert_key = a.alert_key AND c.seq > a.seq)
          AND NOT EXISTS (SELECT 1 FROM alert_raised b
                          WHERE b.site_id = a.site_id AND b.cabinet_id = a.cabinet_id
                            AND b.alert_key = a.alert_key AND b.seq > a.seq)""",
    "calibration_overdue": """
        SELECT f.site_id, f.asset_id, f.epc, f.calibration_due, f.time AS flagged_at,
               f.actors AS flagged_holders, s.state, s.holders, s.since, s.cabinet_id,
               f.event_id
        FROM calibration_flag f
        LEFT JOIN item_state s ON s.site_id = f.site_id AND s.epc = f.epc
        JOIN alert_raised a ON a.event_id = f.event_id
        WHERE a.acked_at IS NULL""",
    "seq_gaps": """
        SELECT site_id, cabinet_id, epoch, first_seq, last_seq,
               last_seq - first_seq + 1 AS missing, opened_at
        FROM seq_gap""",
    "audit_anchor_problems": """
        SELECT site_id, cabinet_id, time, seq, problem, event_id
        FROM audit_anchor_problem""",
    "refused_events": """
        SELECT refused_at, topic, site_id, cabinet_id, epoch, seq, event_id, key_id, reason,
               digest, refused_by
        FROM refused_log""",
}


def ensure_schema(db: RecordDb) -> None:
    """Create what is missing; refuse a record written by a newer schema."""
    d = db.dialect

    def create(tx: Tx) -> None:
        if d.name == "postgresql":
            tx.one("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
        for stmt in _tables(d):
            tx.execute(stmt)
        row = tx.one("SELECT value FROM record_meta WHERE key = 'schema_version'")
        if row is None:
            tx.execute(
                "INSERT INTO record_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{db.where} holds record schema {row[0]}; this cabinet-consumer knows "
                f"{SCHEMA_VERSION}: upgrade it"
            )
        for name, body in VIEWS.items():
            if d.name == "sqlite":
                tx.execute(f"DROP VIEW IF EXISTS {name}")
            tx.execute(f"{d.create_view} {name} AS {body}")

    db.transaction(create)


class SchemaTooNew(RuntimeError):
    """The record was written by a newer cabinet-consumer."""
