"""Enrolling a cabinet's TPM with a p3 site key: the three files that travel (docs/privacy.md §5).

1. The cabinet: ``cabinetctl tpm storage-key`` writes its TPM's storage key (public part):
   ``kind = "tpm-storage-key"``.
2. The backend: ``cabinet-consumer tpm-wrap`` wraps the site key's p3 HMAC key to it (software,
   ``wrap_for_cabinet``): ``kind = "site-key-tpm-import"``, importable by that TPM only.
3. The cabinet: ``cabinetctl tpm import`` has its TPM import it (``import_into``) and writes the
   site key file the agent reads (``source = "tpm"``, a blob only that TPM can load).

The site key itself never reaches the cabinet; the backend keeps it and computes every
pseudonym of the site in software (allow-lists) exactly as the cabinets compute it with their
TPMs. The backend uses this module through ``backend`` (the shared contract), the cabinet
through ``agent.cli``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.privacy.keyfile import KID_PATTERN, KeyFileError, read_key_toml, write_key_text
from agent.privacy.pseudonym import (
    BADGE_PURPOSE_V3,
    Argon2Params,
    SiteKey,
    TpmSiteKey,
    derive_purpose_key,
)
from agent.privacy.tpm import MAX_BLOB, TpmDuplicate, import_duplicate, wrap_hmac_key

__all__ = [
    "STORAGE_KEY_KIND",
    "TPM_IMPORT_KIND",
    "SiteKeyImport",
    "import_into",
    "read_site_key_import",
    "read_storage_key",
    "storage_key_text",
    "wrap_for_cabinet",
    "write_site_key_import",
    "write_storage_key",
]

STORAGE_KEY_KIND: Final = "tpm-storage-key"
TPM_IMPORT_KIND: Final = "site-key-tpm-import"
_KID_RE: Final = re.compile(KID_PATTERN)
_SITE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


@dataclass(frozen=True, slots=True)
class SiteKeyImport:
    """A p3 site key wrapped for one cabinet's TPM: ids, parameters, the duplicate."""

    kid: str
    site_id: str
    argon2: Argon2Params
    dup: TpmDuplicate = field(repr=False)

    @property
    def prefix(self) -> str:
        return f"p3.{self.kid}"


def storage_key_text(public: bytes) -> str:
    """The file the cabinet hands the backend: its TPM's storage key (``storage_parent``)."""
    return (
        f"# cabinet-agent {STORAGE_KEY_KIND}: a cabinet TPM's storage key (public part). Give it\n"
        "# to the backend: cabinet-consumer tpm-wrap wraps the site key to it.\n"
        f'kind = "{STORAGE_KEY_KIND}"\n'
        f'public = "{base64.b64encode(public).decode("ascii")}"\n'
    )


def write_storage_key(path: Path, public: bytes) -> None:
    write_key_text(path, storage_key_text(public), secret=False)


def read_storage_key(path: Path) -> bytes:
    data = read_key_toml(path, STORAGE_KEY_KIND, secret=False)
    unknown = sorted(str(k) for k in data if k not in ("kind", "public"))
    if unknown:
        raise KeyFileError(f"{path}: {unknown[0]} is not a field of a {STORAGE_KEY_KIND} file")
    return _b64(path, data.get("public"), "public")


def wrap_for_cabinet(site_id: str, site: SiteKey, storage_key: bytes) -> SiteKeyImport:
    """The backend's half: the p3 HMAC key of ``site`` wrapped to one TPM's storage key."""
    if not site.tpm or site.argon2 is None:
        raise ValueError(f"site key {site.prefix} is not a p3 (TPM) key: make one with --scheme p3")
    hmac_key = derive_purpose_key(site.key, site_id, BADGE_PURPOSE_V3)
    return SiteKeyImport(site.kid, site_id, site.argon2, wrap_hmac_key(storage_key, hmac_key))


def write_site_key_import(path: Path, imp: SiteKeyImport) -> None:
    """Write what ``cabinetctl tpm import`` reads (0600: only its TPM can use it, but still)."""
    write_key_text(
        path,
        f"# cabinet-agent {TPM_IMPORT_KIND}: site key {imp.prefix} wrapped for one cabinet's\n"
        "# TPM; import it there with cabinetctl tpm import (docs/privacy.md §5).\n"
        f'kind = "{TPM_IMPORT_KIND}"\n'
        f'kid = "{imp.kid}"\n'
        'scheme = "p3"\n'
        f'site = "{imp.site_id}"\n' + imp.argon2.to_toml() + imp.dup.to_toml(),
        secret=True,
    )


def read_site_key_import(path: Path) -> SiteKeyImport:
    data = read_key_toml(path, TPM_IMPORT_KIND, secret=True)
    unknown = sorted(
        str(k) for k in data if k not in ("kind", "kid", "scheme", "site", "argon2id", "tpm")
    )
    if unknown:
        raise KeyFileError(f"{path}: {unknown[0]} is not a field of a {TPM_IMPORT_KIND} file")
    kid, site = data.get("kid"), data.get("site")
    if not isinstance(kid, str) or _KID_RE.fullmatch(kid) is None:
        raise KeyFileError(f"{path}: kid must match {KID_PATTERN}")
    if not isinstance(site, str) or _SITE_RE.fullmatch(site) is None:
        raise KeyFileError(f"{path}: site must be a site id")
    if data.get("scheme") != "p3":
        raise KeyFileError(f'{path}: scheme must be "p3"')
    try:
        argon2 = Argon2Params.from_table(data.get("argon2id", {}))
        dup = TpmDuplicate.from_table(data.get("tpm"))
    except ValueError as err:
        raise KeyFileError(f"{path}: {err}") from None
    return SiteKeyImport(kid, site, argon2, dup)


def import_into(tcti: str, imp: SiteKeyImport) -> TpmSiteKey:
    """The cabinet's half: its TPM imports the key; the blob it returns is the key file's.

    TpmError (one line) if the TPM is unreachable or the import was made for another TPM.
    """
    return TpmSiteKey(imp.kid, imp.site_id, imp.argon2, import_duplicate(tcti, imp.dup))


def _b64(path: Path, value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{path}: {name} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: {name} is not valid base64") from None
    if not 2 <= len(raw) <= MAX_BLOB:
        raise KeyFileError(f"{path}: {name} must be 2 to {MAX_BLOB} bytes")
    return raw
