"""Signing the backend's documents for cabinets: the allow-list, the asset registry, erasures.

The wire format, canonical JSON and the acceptance rules belong to the cabinet
(``agent.privacy.signed``, specified in ``docs/privacy.md``); this module only builds and signs,
and checks every document with the cabinet's own rules first, so the backend cannot sign what
a cabinet would refuse.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.domain.access import AllowList
from agent.domain.assets import AssetRegistry
from agent.privacy.erasure import ErasureRequest
from agent.privacy.keyfile import KID_PATTERN
from agent.privacy.pseudonym import Pseudonymizer, SiteKey, is_pseudonym
from agent.privacy.signed import (
    ALLOW_LIST,
    ASSET_REGISTRY,
    ERASURE,
    canonical_json,
    check_fields,
    format_time,
)

__all__ = [
    "allow_list_doc",
    "asset_registry_doc",
    "badge_pseudonyms",
    "erasure_doc",
    "sign_document",
]

_KID_RE: Final = re.compile(KID_PATTERN)
_ROLE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,31}")  # allow-list roles


def badge_pseudonyms(site_id: str, site: SiteKey, badges: Iterable[str]) -> dict[str, str]:
    """Badge id -> pseudonym, as the cabinets of ``site_id`` compute it under ``site``: an
    allow-list names people only by these (one derivation each: p2 costs tens of ms)."""
    pseudo = Pseudonymizer.from_site_key(site_id, site)
    return {badge: pseudo.badge(badge) for badge in badges}


def sign_document(private_key: Ed25519PrivateKey, kid: str, doc: Mapping[str, Any]) -> bytes:
    """The wire form ``{"doc": ..., "kid": ..., "sig": ...}`` (canonical JSON, UTF-8)."""
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise ValueError(f"kid must match {_KID_RE.pattern}, got {kid!r}")
    canonical = canonical_json(doc)
    # Refuse to sign what the verifier would refuse: fail at the backend, not in the field.
    check_fields(canonical, kid)
    sig = base64.b64encode(private_key.sign(canonical)).decode("ascii")
    return canonical_json({"doc": doc, "kid": kid, "sig": sig})


def allow_list_doc(
    site_id: str,
    cabinet_id: str,
    version: int,
    expires_at: datetime,
    entries: Mapping[str, Sequence[str]],
    issued_at: datetime | None = None,
) -> dict[str, Any]:
    """An unsigned allow-list document: pseudonym -> sorted roles.

    The body is checked with the cabinet's own model (``AllowList.from_body``), so the backend
    cannot sign an allow-list the cabinet would refuse; roles must also match the role pattern.
    """
    body: dict[str, list[str]] = {}
    for pseudonym, roles in entries.items():
        if not is_pseudonym(pseudonym):
            raise ValueError("allow-list keys must be badge pseudonyms (p1|p2|p3.<kid>.<base32>)")
        if isinstance(roles, str):
            raise ValueError(f"roles of {pseudonym} must be a list of strings, not one string")
        bad = [r for r in roles if not isinstance(r, str) or _ROLE_RE.fullmatch(r) is None]
        if bad:
            raise ValueError(f"roles of {pseudonym} must match {_ROLE_RE.pattern}: {bad!r}")
        body[pseudonym] = sorted(set(roles))
    doc = _doc(ALLOW_LIST, site_id, cabinet_id, version, expires_at, issued_at, {"entries": body})
    AllowList.from_body(version, expires_at, doc["body"])  # AllowListError is a ValueError
    return doc


def asset_registry_doc(
    site_id: str,
    cabinet_id: str,
    version: int,
    expires_at: datetime,
    assets: Sequence[Mapping[str, Any]],
    issued_at: datetime | None = None,
) -> dict[str, Any]:
    """An unsigned asset-registry document, checked with the cabinet's own model.

    Every asset needs a unique lower-case hex ``epc`` and an ``asset_id``; ``name``,
    ``home_drawer``, ``calibration_due``, ``consumable`` and ``sku`` (required for a consumable),
    and ``tid`` (the TID that pins the item to its tag, unique) are optional
    (``AssetRegistry.from_body``), other fields are carried along unread.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, asset in enumerate(assets):
        if not isinstance(asset, Mapping):
            raise ValueError(f"asset [{i}] must be a mapping")
        epc = asset.get("epc")
        if isinstance(epc, str):
            if epc in seen:
                raise ValueError(f"asset [{i}]: epc {epc} appears twice")
            seen.add(epc)
        out.append(dict(asset))
    doc = _doc(ASSET_REGISTRY, site_id, cabinet_id, version, expires_at, issued_at, {"assets": out})
    AssetRegistry.from_body(doc["body"])  # AssetRegistryError is a ValueError
    return doc


def erasure_doc(
    site_id: str,
    cabinet_id: str,
    version: int,
    expires_at: datetime,
    pseudonyms: Sequence[str],
    issued_at: datetime | None = None,
) -> dict[str, Any]:
    """An unsigned erasure document (docs/privacy.md §7): the cabinets erase every trace of
    these pseudonyms they hold. Publish an allow-list without them first (a cabinet refuses an
    erasure of someone its allow-list still lists). Checked with the cabinet's own model."""
    body = {"pseudonyms": sorted(set(pseudonyms))}
    if len(body["pseudonyms"]) != len(pseudonyms):
        raise ValueError("pseudonyms must not repeat")
    doc = _doc(ERASURE, site_id, cabinet_id, version, expires_at, issued_at, body)
    ErasureRequest.from_body(doc["body"])  # ErasureError is a ValueError
    return doc


def _doc(
    kind: str,
    site_id: str,
    cabinet_id: str,
    version: int,
    expires_at: datetime,
    issued_at: datetime | None,
    body: dict[str, Any],
) -> dict[str, Any]:
    issued = issued_at if issued_at is not None else datetime.now(UTC).replace(microsecond=0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError("version must be a non-negative int")
    if expires_at <= issued:
        raise ValueError("expires_at must be after issued_at")
    return {
        "kind": kind,
        "site_id": site_id,
        "cabinet_id": cabinet_id,
        "version": version,
        "issued_at": format_time(issued),
        "expires_at": format_time(expires_at),
        "body": body,
    }
