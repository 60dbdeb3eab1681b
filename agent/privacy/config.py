"""The ``[privacy]`` config section (where the cabinet's key files are) and its loader.

Relative paths name systemd credentials: they resolve against ``$CREDENTIALS_DIRECTORY``
(``LoadCredential=`` in the unit), so keys never sit next to the config file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, field_validator

from agent.privacy.envelope import Sealer
from agent.privacy.keyfile import KeyFileError
from agent.privacy.keys import load_hpke_public, load_signing_public
from agent.privacy.pseudonym import (
    BadgePseudonyms,
    KeyDevice,
    LiveKey,
    Pseudonymizer,
    SiteKey,
    TpmSiteKey,
    load_cabinet_site_key,
)
from agent.privacy.signed import DocumentVerifier
from agent.privacy.tcti import DEFAULT_TCTI, check_tcti
from drivers.config import StrictModel

__all__ = ["CabinetPrivacy", "PrivacyConfig", "load_cabinet_privacy", "open_site_key"]

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


class PrivacyConfig(StrictModel):
    site_key: Path = Field(
        Path("site-key"),
        description="site pseudonym key (secret, mode 0600); relative = systemd credential name",
    )
    previous_site_key: Path | None = Field(
        None,
        description="the site key being retired during a rotation: a badge is derived under it "
        "while the allow-list names people only by its pseudonyms (docs/privacy.md)",
    )
    tpm_tcti: str = Field(
        DEFAULT_TCTI,
        description='where the TPM is, for a site key file held in a TPM (source = "tpm"); '
        "tpm2-tools TCTI syntax: device:/dev/tpmrm0, swtpm:host=…,port=…",
    )
    seal_public_key: Path = Field(
        Path("backend-seal.pub"), description="backend HPKE public key events are sealed to"
    )
    signing_public_keys: list[Path] = Field(
        default=[Path("backend-sign.pub")],
        min_length=1,
        max_length=8,
        description="backend document-signing public keys (several during a key rotation)",
    )
    max_clock_skew_s: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="how far in the future a signed document's issued_at may be (no RTC)",
    )
    max_document_ahead_days: float = Field(
        366.0,
        ge=1,
        le=3660,
        description="while the wall clock is untrusted, how far after the agent's own time a "
        "signed document's issued_at may be (its time is then a lower bound, not a reading)",
    )

    @field_validator("tpm_tcti")
    @classmethod
    def _tcti(cls, value: str) -> str:
        return check_tcti(value)


@dataclass(frozen=True)
class CabinetPrivacy:
    """The cabinet's privacy tools, built from its key files."""

    pseudonyms: BadgePseudonyms
    sealer: Sealer
    verifier: DocumentVerifier
    signing_kids: tuple[str, ...]
    credentials_dir: Path | None = field(default=None, repr=False)

    @property
    def seal_key_id(self) -> str:
        return self.sealer.key_id

    def load_site_keys(self, cfg: PrivacyConfig) -> tuple[LiveKey, LiveKey | None]:
        """SIGHUP, first half (blocking: a worker thread): read the site key files of ``cfg``,
        opening a TPM only for a TPM key that is not live already. KeyFileError names the file."""
        site_id = self.pseudonyms.live[0].site_id
        return load_site_keys(cfg, self.credentials_dir, site_id, live=self.pseudonyms.live)

    def apply_site_keys(self, current: LiveKey, previous: LiveKey | None) -> list[KeyDevice]:
        """SIGHUP, second half (on the loop): make them the live keys. Returns the devices
        no longer used, for the caller to close off the loop."""
        return self.pseudonyms.replace(current, previous)

    def close(self) -> None:
        """Release the live keys' devices (a TPM connection); the agent is stopping."""
        self.pseudonyms.close()


def load_site_keys(
    cfg: PrivacyConfig,
    credentials_dir: Path | None,
    site_id: str,
    *,
    live: tuple[Pseudonymizer, ...] = (),
) -> tuple[LiveKey, LiveKey | None]:
    """The current site key and the previous one (if configured); KeyFileError names the file.

    A TPM key file is opened in its TPM (``cfg.tpm_tcti``) unless one of ``live`` is that very
    key already; any TPM problem is a KeyFileError naming the file and the reason.
    """
    path = _resolve(cfg.site_key, credentials_dir)
    current = open_site_key(path, cfg.tpm_tcti, site_id, live=live)
    if cfg.previous_site_key is None:
        return current, None
    path = _resolve(cfg.previous_site_key, credentials_dir)
    try:
        previous = open_site_key(path, cfg.tpm_tcti, site_id, live=live)
        if previous.prefix == current.prefix:
            raise KeyFileError(
                f"{path}: privacy.previous_site_key has the id and scheme of privacy.site_key "
                f"({current.prefix}): give the retiring key, or remove previous_site_key"
            )
    except BaseException:
        _close_new(current, live)
        raise
    return current, previous


def open_site_key(
    path: Path, tcti: str, site_id: str, *, live: tuple[Pseudonymizer, ...] = ()
) -> LiveKey:
    """A cabinet's site key from its file: the key (p1/p2), or its TPM-held key bound to the
    TPM at ``tcti`` (p3). KeyFileError, one line naming the file, for anything that will not
    work: a p3 key in a file (it belongs in a TPM), a blob for another TPM or site, no TPM, no
    bindings."""
    key = load_cabinet_site_key(path)
    if isinstance(key, SiteKey):
        if key.tpm:
            raise KeyFileError(
                f"{path}: a p3 site key belongs in the cabinet's TPM, not in a file on its disk: "
                "enrol it with cabinetctl tpm import (docs/privacy.md §5)"
            )
        return key
    return _open_tpm_key(path, key, tcti, site_id, live)


def _open_tpm_key(
    path: Path, key: TpmSiteKey, tcti: str, site_id: str, live: tuple[Pseudonymizer, ...]
) -> Pseudonymizer:
    # Only a site key held in a TPM loads the TPM code (and, through it, tpm2-pytss).
    from agent.privacy.tpm import TpmError, TpmHmacKey

    if key.site_id != site_id:
        raise KeyFileError(
            f"{path}: the TPM key was made for site {key.site_id!r}, this cabinet is in {site_id!r}"
        )
    for pseudonymizer in live:
        device = pseudonymizer.device
        if (
            isinstance(device, TpmHmacKey)
            and device.tcti == tcti
            and device.blob == key.blob
            and pseudonymizer.prefix == key.prefix
            and pseudonymizer.argon2 == key.argon2
        ):
            return pseudonymizer  # already open: a reload that keeps it opens nothing
    try:
        device = TpmHmacKey(tcti, key.blob)
    except TpmError as err:
        raise KeyFileError(f"{path}: site key {key.prefix} held in a TPM: {err}") from None
    return Pseudonymizer.held_in(site_id, key.kid, key.argon2, device)


def _close_new(key: LiveKey, live: tuple[Pseudonymizer, ...]) -> None:
    if isinstance(key, Pseudonymizer) and key.device is not None and key not in live:
        key.device.close()


def _resolve(path: Path, credentials_dir: Path | None) -> Path:
    if path.is_absolute():
        return path
    if credentials_dir is None:
        raise KeyFileError(
            f"{path}: relative key path but ${CREDENTIALS_ENV} is not set "
            "(run under systemd with LoadCredential=, or give an absolute path in [privacy])"
        )
    return credentials_dir / path


def load_cabinet_privacy(
    cfg: PrivacyConfig,
    site_id: str,
    cabinet_id: str,
    *,
    credentials_dir: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> CabinetPrivacy:
    """Load the key files; KeyFileError (permanent) names the file and the fix."""
    if credentials_dir is None and environ.get(CREDENTIALS_ENV):
        credentials_dir = Path(environ[CREDENTIALS_ENV])

    def resolve(path: Path) -> Path:
        return _resolve(path, credentials_dir)

    current, previous = load_site_keys(cfg, credentials_dir, site_id)
    try:
        pseudonyms = BadgePseudonyms(site_id, current, previous)
        seal_kid, seal_key = load_hpke_public(resolve(cfg.seal_public_key))
        signing: dict[str, Ed25519PublicKey] = {}
        for path in cfg.signing_public_keys:
            kid, key = load_signing_public(resolve(path))
            if kid in signing:
                raise KeyFileError(f"{resolve(path)}: signing key id {kid!r} appears twice")
            signing[kid] = key
    except BaseException:
        # A site key held in a TPM opened a connection to it: nothing may leave it behind.
        for live_key in (current, previous):
            if live_key is not None:
                _close_new(live_key, ())
        raise
    verifier = DocumentVerifier(
        signing,
        site_id,
        cabinet_id,
        max_clock_skew=timedelta(seconds=cfg.max_clock_skew_s),
        max_ahead=max(
            timedelta(days=cfg.max_document_ahead_days), timedelta(seconds=cfg.max_clock_skew_s)
        ),
    )
    return CabinetPrivacy(
        pseudonyms=pseudonyms,
        sealer=Sealer(seal_key, seal_kid),
        verifier=verifier,
        signing_kids=tuple(signing),
        credentials_dir=credentials_dir,
    )
