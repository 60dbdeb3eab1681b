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
from pydantic import Field

from agent.privacy.envelope import Sealer
from agent.privacy.keyfile import KeyFileError
from agent.privacy.keys import load_hpke_public, load_signing_public
from agent.privacy.pseudonym import BadgePseudonyms, SiteKey, load_site_key
from agent.privacy.signed import DocumentVerifier
from drivers.config import StrictModel

__all__ = ["CabinetPrivacy", "PrivacyConfig", "load_cabinet_privacy"]

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

    def reload_site_keys(self, cfg: PrivacyConfig) -> tuple[str, ...]:
        """SIGHUP: re-read the site key files of ``cfg`` and make them the live keys.

        Returns their ``<scheme>.<kid>`` prefixes, current first. On KeyFileError the live keys
        stay as they were.
        """
        current, previous = load_site_keys(cfg, self.credentials_dir)
        self.pseudonyms.replace(current, previous)
        return self.pseudonyms.prefixes


def load_site_keys(
    cfg: PrivacyConfig, credentials_dir: Path | None
) -> tuple[SiteKey, SiteKey | None]:
    """The current site key and the previous one (if configured); KeyFileError names the file."""
    current = load_site_key(_resolve(cfg.site_key, credentials_dir))
    if cfg.previous_site_key is None:
        return current, None
    path = _resolve(cfg.previous_site_key, credentials_dir)
    previous = load_site_key(path)
    if previous.prefix == current.prefix:
        raise KeyFileError(
            f"{path}: privacy.previous_site_key has the id and scheme of privacy.site_key "
            f"({current.prefix}): give the retiring key, or remove previous_site_key"
        )
    return current, previous


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

    current, previous = load_site_keys(cfg, credentials_dir)
    pseudonyms = BadgePseudonyms(site_id, current, previous)
    seal_kid, seal_key = load_hpke_public(resolve(cfg.seal_public_key))
    signing: dict[str, Ed25519PublicKey] = {}
    for path in cfg.signing_public_keys:
        kid, key = load_signing_public(resolve(path))
        if kid in signing:
            raise KeyFileError(f"{resolve(path)}: signing key id {kid!r} appears twice")
        signing[kid] = key
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
