"""Domain events: what the cabinet tells the backend. Versioned pydantic models, one JSON schema.

Every event carries ``schema_version``, a UUIDv7 ``event_id`` (consumers drop duplicates by it),
``seq`` (per-cabinet, monotonic; 0 until the state store assigns it at commit), ``time`` (UTC),
``clock`` (whether that time came from a trusted wall clock), ``site_id``, ``cabinet_id`` and a
``type`` discriminator. People appear only as pseudonyms
(``p1.<kid>.<b32>``), ``"unknown"`` (a forced door) or ``"erased"`` (someone the backend
erased while their session was open, docs/privacy.md §7): a raw badge id cannot pass validation.

Regenerate the published schema with ``python -m agent.domain.events > docs/events.schema.json``.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Collection
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

SCHEMA_VERSION = 1

# A pseudonym from agent/privacy: "p<scheme>.<key id>.<base32 of 16 bytes>" -- p1 (HMAC-SHA256,
# legacy), p2 (Argon2id) or p3 (Argon2id over a TPM's HMAC). A raw card number (decimal or hex
# digits) can never match: it has no "p1."/"p2."/"p3." prefix. Exactly what agent.privacy.pseudonym.Pseudonymizer.badge() produces.
# The one definition (agent.privacy.pseudonym checks pseudonyms with it too); the key id part
# is agent.privacy.keyfile.KID_PATTERN (tests/test_privacy_pseudonym.py keeps them equal).
PSEUDONYM_BODY = r"p[123]\.[a-z0-9][a-z0-9_-]{0,15}\.[a-z2-7]{26}"
PSEUDONYM_PATTERN = rf"^{PSEUDONYM_BODY}$"
UNKNOWN_ACTOR = "unknown"
# Stands for a person erased on the backend's request while the engine state still named them
# (an open session, a badge in the unlock window): later events of that session stay consistent
# (the same session, its holders) without naming them again.
ERASED_ACTOR = "erased"
ACTOR_PATTERN = rf"^(?:{UNKNOWN_ACTOR}|{ERASED_ACTOR}|{PSEUDONYM_BODY})$"


def unprintable(text: str) -> bool:
    """``text`` holds a control (C0, C1), format (bidi overrides, zero-width), private-use,
    surrogate or unassigned character, or a line/paragraph separator: what would rearrange or
    hide text on the terminal of whoever reads it (``cabinetctl status``, ``audit tail``)."""
    for c in text:
        category = unicodedata.category(c)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return True
    return False


def erase_actors(actors: list[str], erased: Collection[str]) -> int:
    """Replace, in place, each of ``actors`` that is ``erased`` by ``ERASED_ACTOR`` (once:
    the list stays one entry per holder); how many were replaced."""
    kept: list[str] = []
    changed = 0
    for actor in actors:
        if actor in erased:
            changed += 1
            actor = ERASED_ACTOR
        if actor not in kept:
            kept.append(actor)
    actors[:] = kept
    return changed


EPC_PATTERN = r"^(?:[0-9a-f]{2}){1,64}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Actor = Annotated[
    str, Field(pattern=ACTOR_PATTERN, description="badge pseudonym, 'unknown' or 'erased'")
]
Pseudonym = Annotated[str, Field(pattern=PSEUDONYM_PATTERN, description="badge pseudonym")]
Epc = Annotated[str, Field(pattern=EPC_PATTERN, description="tag EPC, lower-case hex")]
Drawer = Annotated[str, Field(pattern=NAME_PATTERN, description="drawer (antenna group) name")]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
AssetId = Annotated[str, Field(min_length=1, max_length=128)]
Detail = Annotated[str, Field(max_length=200, description="short human reason, no personal data")]
Actors = Annotated[list[Actor], Field(min_length=1, description="every holder of the session")]

# "erased": the supervisor was erased on the backend's request while their session was open.
TECHNICIAN_PATTERN = rf"^(?:uid:[0-9]{{1,10}}|{ERASED_ACTOR}|{PSEUDONYM_BODY})$"
TechnicianId = Annotated[
    str,
    Field(
        pattern=TECHNICIAN_PATTERN,
        description="'uid:<n>': the controller's local account that opened it with cabinetctl; "
        "or the supervisor's badge pseudonym ('erased' once the backend erased them)",
    ),
]
DenyReason = Literal[
    "unknown badge",
    "role",
    "allow-list expired",
    "no allow-list",
    "locked out",
    "technician session",  # the door is a technician session's (from its unlock to its scan)
    "door test",  # cabinetctl door test holds the door
]
ScanPurpose = Literal["session", "background"]


class EventBase(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event_id: UUID = Field(description="UUIDv7; consumers drop duplicates by it")
    seq: int = Field(0, ge=0, description="per-cabinet sequence; assigned at commit (0 before)")
    time: datetime = Field(description="UTC time the agent observed the event")
    clock: Literal["trusted", "untrusted"] = Field(
        "trusted",
        description="'untrusted': the wall clock is not proven right: it disagreed with the "
        "agent's own time (it stepped, or read earlier than what the agent had already seen: "
        "no RTC, before NTP) and time is then the agent's estimate carried on the monotonic "
        "clock (after a reboot without RTC a lower bound: the downtime is not counted); or, "
        "after a reboot before time sync, the wall clock was taken on faith (provisional)",
    )
    site_id: Name
    cabinet_id: Name

    @field_validator("event_id")
    @classmethod
    def _uuid7(cls, value: UUID) -> UUID:
        if value.version != 7:
            raise ValueError("event_id must be a UUIDv7")
        return value

    @field_validator("time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("time must be timezone-aware")
        return value.astimezone(UTC)


class ItemCheckedOut(EventBase):
    """An item left the cabinet during a door session (missing in every complete pass)."""

    type: Literal["item.checked_out"] = "item.checked_out"
    session_id: UUID
    actors: Actors
    epc: Epc
    asset_id: AssetId | None = None
    drawer: Drawer | None = Field(None, description="where the item was before the session")


class ItemReturned(EventBase):
    """An item appeared in the cabinet during a door session."""

    type: Literal["item.returned"] = "item.returned"
    session_id: UUID
    actors: Actors
    epc: Epc
    asset_id: AssetId | None = None
    drawer: Drawer = Field(description="where the item was found")
    held_by: list[Actor] | None = Field(
        None,
        description="returned by someone other than its holder: who checked it out (the "
        "actors of that session); absent when a holder returned it or the holder is not known",
    )
    returned_by: list[Actor] | None = Field(
        None, description="with held_by: who returned it (this session's actors)"
    )


class SessionOpened(EventBase):
    """The door opened: a door session (cycle) starts."""

    type: Literal["session.opened"] = "session.opened"
    session_id: UUID
    actors: Actors
    trigger: Literal["badge", "forced"]
    door_id: Name


class SessionClosed(EventBase):
    """A door session ended; the scan quality says whether its inventory can be trusted."""

    type: Literal["session.closed"] = "session.closed"
    session_id: UUID
    actors: Actors
    quality: Literal["complete", "incomplete"]
    duration_s: float = Field(ge=0, description="door opened → session closed")
    scan_duration_ms: int = Field(ge=0, description="all scan passes, including rescans")
    reads: int = Field(ge=0, description="tag reads counted in the accepted passes")
    tags: int = Field(ge=0, description="tags present")
    passes: int = Field(ge=0, description="scan passes run, including rescans")
    checked_out: int = Field(ge=0)
    returned: int = Field(ge=0)
    consumed: int = Field(0, ge=0, description="consumables taken (item.consumed)")
    restocked: int = Field(0, ge=0, description="consumables put in (item.restocked)")


class AccessDenied(EventBase):
    """A badge was refused."""

    type: Literal["access.denied"] = "access.denied"
    actor: Actor
    badge_reader: Name
    reason: DenyReason


class AccessGraceGranted(EventBase):
    """A badge was let in although the allow-list had expired, under the configured grace policy
    (``[domain] expired_allow_list_grace_h``, for the roles in ``expired_allow_list_grace_roles``)."""

    type: Literal["access.grace_granted"] = "access.grace_granted"
    actor: Pseudonym
    badge_reader: Name
    roles: list[Literal["user", "supervisor"]] = Field(
        description="the actor's roles the grace policy admitted"
    )
    allow_list_version: int = Field(ge=0)
    expired_at: datetime = Field(description="when the allow-list expired")
    grace_until: datetime = Field(description="end of the grace period")


class AccessLockout(EventBase):
    """A badge reader was locked out after repeated denials, or the lock-out ended."""

    type: Literal["access.lockout"] = "access.lockout"
    badge_reader: Name
    state: Literal["locked", "cleared", "expired"]
    denials: int = Field(ge=0, description="denials that triggered the lock-out")
    until: datetime | None = Field(None, description="end of the lock-out (state 'locked')")
    actor: Actor | None = Field(None, description="the supervisor who cleared it")


class DoorForced(EventBase):
    """The door opened without a valid badge."""

    type: Literal["door.forced"] = "door.forced"
    session_id: UUID
    door_id: Name


class DoorLeftOpen(EventBase):
    """The door has been open too long; repeated every period while it stays open."""

    type: Literal["door.left_open"] = "door.left_open"
    session_id: UUID
    door_id: Name
    actors: list[Actor] = Field(
        description="every holder of the session; in a technician session, whoever badged "
        "into it (possibly nobody: `technician` holds the door then)"
    )
    technician: TechnicianId | None = Field(
        None, description="set when the door is held open in a technician session"
    )
    open_s: float = Field(ge=0)
    alert: int = Field(ge=1, description="1 for the first alert of this opening, then 2, 3, …")
    night: bool = Field(
        False,
        description="the night period was in force ([domain] night_left_open_s during the "
        "night hours, the site's local time)",
    )

    @model_validator(mode="after")
    def _someone_holds_the_door(self) -> DoorLeftOpen:
        if not self.actors and self.technician is None:
            raise ValueError("actors: at least one, outside a technician session")
        return self


class ItemUnknown(EventBase):
    """A tag not in the asset registry appeared."""

    type: Literal["item.unknown"] = "item.unknown"
    epc: Epc
    drawer: Drawer
    session_id: UUID | None = None


class ItemMisplaced(EventBase):
    """An item was put back in a drawer other than its home drawer."""

    type: Literal["item.misplaced"] = "item.misplaced"
    epc: Epc
    asset_id: AssetId
    drawer: Drawer
    home_drawer: Drawer
    session_id: UUID | None = None


TidHex = Annotated[
    str,
    Field(pattern=r"^(?:[0-9a-f]{4}){2,32}$", description="tag TID, lower-case hex, whole words"),
]


class ItemCounterfeit(EventBase):
    """A tag carrying a registered item's EPC answered with a TID other than the one the asset
    registry pins the item to: a cloned tag. It is not the item: never returned, never in the
    inventory; if the item itself is gone, that is reported as ever (``item.checked_out``).
    Reported once per TID while the tag stays in the cabinet."""

    type: Literal["item.counterfeit"] = "item.counterfeit"
    epc: Epc
    asset_id: AssetId
    tid: TidHex = Field(description="the TID the tag answered with (not the pinned one)")
    drawer: Drawer = Field(description="where the tag was found")
    session_id: UUID | None = None
    actors: list[Actor] | None = Field(
        None, description="the door session's holders (None: found by a background inventory)"
    )


class ItemMissing(EventBase):
    """An item vanished without a door session (confirmed by a background inventory), or
    while the baseline could not be trusted (nobody can be named for it)."""

    type: Literal["item.missing"] = "item.missing"
    epc: Epc
    asset_id: AssetId | None = None
    drawer: Drawer | None = Field(None, description="where it was last seen")


class ItemCalibrationOverdue(EventBase):
    """An item whose calibration is overdue was checked out."""

    type: Literal["item.calibration_overdue"] = "item.calibration_overdue"
    session_id: UUID
    actors: Actors
    epc: Epc
    asset_id: AssetId
    calibration_due: date


class ItemOverdue(EventBase):
    """An item has been out longer than its limit (the asset registry's ``overdue_after_s``,
    else ``[domain] overdue_after_s``): raised once per check-out, by the cabinet itself."""

    type: Literal["item.overdue"] = "item.overdue"
    session_id: UUID = Field(description="the session that checked it out")
    held_by: Actors = Field(description="who checked it out (that session's actors)")
    epc: Epc
    asset_id: AssetId | None = None
    drawer: Drawer | None = Field(None, description="where it was before it was taken")
    checked_out_at: datetime = Field(description="UTC time of the check-out")
    limit_s: float = Field(gt=0, description="the limit it exceeded")
    out_s: float = Field(ge=0, description="how long it has been out")

    @field_validator("checked_out_at")
    @classmethod
    def _utc_checkout(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("checked_out_at must be timezone-aware")
        return value.astimezone(UTC)


class InventoryIncomplete(EventBase):
    """A scan could not be trusted (a reader or antenna was unhealthy): no check-outs from it."""

    type: Literal["inventory.incomplete"] = "inventory.incomplete"
    purpose: ScanPurpose
    session_id: UUID | None = None
    attempt: int = Field(ge=1, description="1 for the first failed pass of this cycle")
    will_retry: bool
    reasons: list[Detail] = Field(max_length=64)


class InventorySuspect(EventBase):
    """A drawer that held tags read nothing at all in two passes — an unplugged antenna the
    reader could not report, more likely than a drawer emptied at once. Its tags are *held*:
    not checked out (nor reported missing), kept in the baseline; once the drawer reads again,
    a held tag that is gone is reported as ``item.missing`` (no actor: it cannot be known who
    took it). Repeated at every door cycle or background inventory while the drawer stays blind.
    """

    type: Literal["inventory.suspect"] = "inventory.suspect"
    purpose: ScanPurpose
    session_id: UUID | None = None
    drawer: Drawer
    held: int = Field(ge=1, description="tags of that drawer held in the baseline")
    first: bool = Field(description="true when the drawer has just turned blind")
    detail: Detail = ""


class InventorySnapshot(EventBase):
    """The cabinet's full contents after a complete background inventory."""

    type: Literal["inventory.snapshot"] = "inventory.snapshot"
    tags: int = Field(ge=0)
    by_drawer: dict[Drawer, int]
    items: dict[Epc, Drawer] = Field(description="EPC → drawer")
    skus: dict[Sku, int] = Field(
        default_factory=dict, description="consumables present, counted per SKU"
    )


ShortOutages = Annotated[
    int,
    Field(
        ge=0,
        description="outages shorter than the debounce since this reader's previous reader "
        "event: counted, not published one by one",
    ),
]


class ReaderOffline(EventBase):
    """A reader has been away for longer than the debounce (shorter outages are only counted)."""

    type: Literal["reader.offline"] = "reader.offline"
    reader_id: Name
    detail: Detail = ""
    connection: int = Field(ge=0, description="the reader's connection counter")
    down_s: float = Field(0.0, ge=0, description="how long it had been away when reported")
    short_outages: ShortOutages = 0


class ReaderOnline(EventBase):
    """A reader that was reported offline is back."""

    type: Literal["reader.online"] = "reader.online"
    reader_id: Name
    detail: Detail = ""
    connection: int = Field(ge=0)
    antennas_connected: list[int] | None = None
    down_s: float | None = Field(
        None, ge=0, description="how long it was away (None when the agent restarted meanwhile)"
    )
    short_outages: ShortOutages = 0


class ReaderFlapping(EventBase):
    """A reader keeps dropping out (``flapping``: N outages within the window), or has been
    healthy for a whole window again (``stable``). One alert per episode, with counts, instead
    of an offline/online pair per reconnect."""

    type: Literal["reader.flapping"] = "reader.flapping"
    reader_id: Name
    state: Literal["flapping", "stable"]
    outages: int = Field(
        ge=0, description="flapping: outages within the window; stable: outages of the episode"
    )
    window_s: float = Field(gt=0, description="the flap window (also the calm needed to be stable)")
    duration_s: float = Field(0.0, ge=0, description="stable: how long the episode lasted")
    detail: Detail = Field("", description="the latest outage's reason")
    connection: int = Field(ge=0, description="the reader's connection counter")


class AgentAlert(EventBase):
    """The agent itself needs attention: the outbox dropped rows under its overflow policy, the
    disk is full, a corrupt database was quarantined, a row was dead-lettered… Never personal."""

    type: Literal["agent.alert"] = "agent.alert"
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$", description="alert kind")]
    detail: Detail = ""
    dropped: dict[str, int] = Field(
        default_factory=dict, description='events dropped, by priority ("0" critical … "2" routine)'
    )
    dropped_bytes: int = Field(0, ge=0)
    seqs: list[int] = Field(default_factory=list, max_length=1000, description="rows concerned")


class AgentClockStep(EventBase):
    """The wall clock stepped against the monotonic clock, or its trust changed (once per step).

    While ``trusted`` is false the agent keeps its own time on the monotonic clock and every
    event says ``clock: "untrusted"``."""

    type: Literal["agent.clock_step"] = "agent.clock_step"
    step_s: float = Field(
        description="how far the wall clock moved against the monotonic clock (negative: "
        "backward); at start, wall clock minus the agent's time (after a reboot: its persisted "
        "floor, so it includes the downtime); cause 'document': how far the agent's time moved "
        "to the confirmed wall clock"
    )
    wall: datetime = Field(description="what the wall clock read after the step")
    trusted: bool = Field(description="whether the wall clock is trusted from now on")
    at_start: bool = Field(description="noticed at start, against the persisted agent time")
    cause: Literal["wall", "document", "sync"] = Field(
        "wall",
        description="'wall': the wall clock moved (or agreed again); 'document': a fresh signed "
        "document issued by the wall clock's reckoning confirmed the wall clock; 'sync': the "
        "kernel (or the configured time source) reports the wall clock synchronised to a time "
        "server, which proved it (step_s: how far the agent's time moved to it)",
    )


HashHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, hex")]
MAX_ANCHOR_LINKS = 500


class AuditLink(BaseModel):
    """One audit record as the chain links it: no content, only its place and hashes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    prev_hash: HashHex
    hash: HashHex


class AuditAnchor(EventBase):
    """The audit chain's head, published so the backend holds what the device cannot rewrite
    alone (docs/privacy.md §9): ``links`` are the records since the previous anchor, the first
    one's ``prev_hash`` being the previous anchor's ``head_hash``. No personal data: hashes."""

    type: Literal["audit.anchor"] = "audit.anchor"
    head_seq: int = Field(ge=1, description="the chain's last record")
    head_hash: HashHex
    links: list[AuditLink] = Field(
        min_length=1,
        max_length=MAX_ANCHOR_LINKS,
        description="records after the previous anchor, in order, up to head_seq",
    )


# ---- technician sessions and consumables (issue 13, items 1 and 2) --------------------------

# Who does a technician's work: the local account that ran cabinetctl ("uid:<n>", read by the
# kernel from the control socket, SO_PEERCRED) or a supervisor's badge pseudonym. A uid is kept
# as a local uid, not pseudonymized (docs/privacy.md §10): it names an account of this
# controller, and only the controller's account database links it to a person.
TechnicianVia = Literal["cli", "badge"]
Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="the technician's reason, free text (no control characters)",
    ),
]
Sku = Annotated[str, Field(pattern=NAME_PATTERN, description="stock-keeping unit of a consumable")]
PassiveActors = Annotated[
    list[Actor], Field(description="badges presented during the session (may be empty)")
]


class TechnicianOpened(EventBase):
    """A technician session was opened (cabinetctl, or a supervisor badge after cabinetctl asked
    for one): the door is unlocked for maintenance; its opening is not forced and what moves
    during it is a restock or a removal, not a check-out."""

    type: Literal["technician.opened"] = "technician.opened"
    session_id: UUID
    technician: TechnicianId
    via: TechnicianVia
    reason: Reason
    door_id: Name


class TechnicianClosed(EventBase):
    """A technician session ended: after the closing scan (``scanned``), or without the door
    having opened (``not_opened``: the unlock window ran out; ``cancelled``: cabinetctl)."""

    type: Literal["technician.closed"] = "technician.closed"
    session_id: UUID
    technician: TechnicianId
    via: TechnicianVia
    ended: Literal["scanned", "not_opened", "cancelled"]
    quality: Literal["complete", "incomplete", "none"] = Field(
        description="the closing scan's; 'none' when the door never opened"
    )
    duration_s: float = Field(ge=0)
    restocked: int = Field(ge=0)
    removed: int = Field(ge=0)
    actors: PassiveActors = Field(default_factory=list)


class ItemRestocked(EventBase):
    """A tag appeared that nobody is to be credited with a return for: a consumable put in (in
    any session), or any item put in during a technician session."""

    type: Literal["item.restocked"] = "item.restocked"
    session_id: UUID | None = None
    technician: TechnicianId | None = None
    actors: PassiveActors = Field(default_factory=list)
    epc: Epc
    asset_id: AssetId | None = None
    sku: Sku | None = None
    drawer: Drawer


class ItemRemoved(EventBase):
    """An item left the cabinet during a technician session: taken out of stock, not checked
    out (nobody holds it; it is not expected back)."""

    type: Literal["item.removed"] = "item.removed"
    session_id: UUID
    technician: TechnicianId
    epc: Epc
    asset_id: AssetId | None = None
    sku: Sku | None = None
    drawer: Drawer | None = Field(None, description="where the item was before the session")


class ItemConsumed(EventBase):
    """A consumable (asset registry: ``consumable``) left the cabinet: used up, never expected
    back, never missing. ``actors`` empty: it left outside a door session (background
    inventory)."""

    type: Literal["item.consumed"] = "item.consumed"
    session_id: UUID | None = None
    actors: PassiveActors = Field(default_factory=list)
    epc: Epc
    asset_id: AssetId | None = None
    sku: Sku | None = None
    drawer: Drawer | None = Field(None, description="where it was taken from")


class InventoryRebaselined(EventBase):
    """A technician replaced the baseline with what a complete inventory found (cabinetctl
    inventory rebaseline): what differed is neither checked out nor missing. An
    ``inventory.snapshot`` follows."""

    type: Literal["inventory.rebaselined"] = "inventory.rebaselined"
    technician: TechnicianId
    reason: Reason
    added: int = Field(ge=0, description="tags in the new baseline that the old one lacked")
    removed: int = Field(ge=0, description="tags of the old baseline no longer found")
    tags: int = Field(ge=0)


Event: TypeAlias = Annotated[
    ItemCheckedOut
    | ItemReturned
    | SessionOpened
    | SessionClosed
    | AccessDenied
    | AccessGraceGranted
    | AccessLockout
    | DoorForced
    | DoorLeftOpen
    | ItemUnknown
    | ItemMisplaced
    | ItemMissing
    | ItemCounterfeit
    | ItemCalibrationOverdue
    | InventoryIncomplete
    | InventorySuspect
    | InventorySnapshot
    | ReaderOffline
    | ReaderOnline
    | ReaderFlapping
    | AgentAlert
    | AgentClockStep
    | AuditAnchor
    | ItemOverdue
    | TechnicianOpened
    | TechnicianClosed
    | ItemRestocked
    | ItemRemoved
    | ItemConsumed
    | InventoryRebaselined,
    Field(discriminator="type"),
]

event_adapter: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_TYPES: tuple[str, ...] = (
    "item.checked_out",
    "item.returned",
    "session.opened",
    "session.closed",
    "access.denied",
    "access.grace_granted",
    "access.lockout",
    "door.forced",
    "door.left_open",
    "item.unknown",
    "item.misplaced",
    "item.missing",
    "item.counterfeit",
    "item.calibration_overdue",
    "inventory.incomplete",
    "inventory.suspect",
    "inventory.snapshot",
    "reader.offline",
    "reader.online",
    "reader.flapping",
    "agent.alert",
    "agent.clock_step",
    "audit.anchor",
    "item.overdue",
    "technician.opened",
    "technician.closed",
    "item.restocked",
    "item.removed",
    "item.consumed",
    "inventory.rebaselined",
)

PRIORITY_CRITICAL = 0
PRIORITY_NORMAL = 1
PRIORITY_ROUTINE = 2
_CRITICAL = frozenset(
    {
        "item.checked_out",
        "item.returned",
        "door.forced",
        "item.counterfeit",
        "access.lockout",
        "access.grace_granted",
        "agent.alert",
        "agent.clock_step",
        "audit.anchor",
        "technician.opened",
        "item.removed",
        "inventory.rebaselined",
    }
)
_ROUTINE = frozenset({"inventory.snapshot"})


def priority(event: Event) -> int:
    """0 critical (never dropped first), 1 normal, 2 routine (first to go under an overflow policy)."""
    if event.type in _CRITICAL:
        return PRIORITY_CRITICAL
    if event.type in _ROUTINE:
        return PRIORITY_ROUTINE
    return PRIORITY_NORMAL


def with_seq(event: Event, seq: int) -> Event:
    """The same event with its committed sequence number."""
    if seq < 1:
        raise ValueError("committed sequence numbers start at 1")
    return event.model_copy(update={"seq": seq})


def to_json(event: Event) -> bytes:
    """Compact JSON bytes of one event."""
    return event_adapter.dump_json(event)


def from_json(data: bytes | str) -> Event:
    """Parse and validate one event (raises pydantic.ValidationError on bad input)."""
    return event_adapter.validate_json(data)


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every event, as the agent emits them."""
    schema = event_adapter.json_schema(mode="serialization")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cabinet-agent.invalid/schemas/events-v1.json",
        "title": f"cabinet-agent event (schema_version {SCHEMA_VERSION})",
        **schema,
    }


def json_schema_text() -> str:
    """The schema as the committed docs/events.schema.json holds it."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(json_schema_text())
