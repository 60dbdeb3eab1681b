"""[privacy] section: key files found as systemd credentials, and the tools built from them."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.privacy.config import PrivacyConfig, load_cabinet_privacy
from agent.privacy.envelope import EnvelopeHeader, Opener
from agent.privacy.keyfile import KeyFileError
from agent.privacy.pseudonym import Pseudonymizer
from backend.keys import BackendKeys, generate_backend_keys
from backend.signing import allow_list_doc, sign_document


@pytest.fixture
def provisioned(tmp_path: Path) -> tuple[BackendKeys, Path]:
    """A backend key set, and a credentials directory holding only what a cabinet gets."""
    keys = generate_backend_keys(tmp_path / "backend")
    creds = tmp_path / "credentials"
    creds.mkdir()
    for src, dst in (
        ("site.key", "site-key"),
        ("backend-hpke.pub", "backend-seal.pub"),
        ("signing.pub", "backend-sign.pub"),
    ):
        shutil.copy2(tmp_path / "backend" / src, creds / dst)
    return keys, creds


def test_defaults_resolve_against_credentials_directory(
    provisioned: tuple[BackendKeys, Path],
) -> None:
    keys, creds = provisioned
    cab = load_cabinet_privacy(
        PrivacyConfig(), "hangar-3", "crib-07", environ={"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert cab.seal_key_id == keys.hpke_kid
    assert cab.signing_kids == (keys.signing_kid,)

    # the sealer seals to the backend, which opens
    header = EnvelopeHeader(cab.seal_key_id, "crib-07", 1, uuid.uuid4())
    envelope = cab.sealer.seal(header, b'{"type":"door.opened"}')
    assert Opener({keys.hpke_kid: keys.hpke_private}).open(envelope)[1] == b'{"type":"door.opened"}'

    # the backend computes the same pseudonym from the same site key
    backend_view = Pseudonymizer.from_site_key("hangar-3", keys.site)
    assert cab.pseudonyms.badge_now("00000012AB") == backend_view.badge("12ab")

    # documents the backend signs verify on the cabinet
    now = datetime.now(UTC)
    doc = allow_list_doc("hangar-3", "crib-07", 1, now + timedelta(hours=1), {})
    raw = sign_document(keys.signing_private, keys.signing_kid, doc)
    assert cab.verifier.verify(raw, "allow-list", now).version == 1


def test_absolute_paths_need_no_credentials_directory(
    provisioned: tuple[BackendKeys, Path],
) -> None:
    _, creds = provisioned
    cfg = PrivacyConfig(
        site_key=creds / "site-key",
        seal_public_key=creds / "backend-seal.pub",
        signing_public_keys=[creds / "backend-sign.pub"],
    )
    assert load_cabinet_privacy(cfg, "hangar-3", "crib-07", environ={}).seal_key_id == "hpke1"


def test_relative_path_without_credentials_directory_is_explained() -> None:
    with pytest.raises(KeyFileError, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        load_cabinet_privacy(PrivacyConfig(), "hangar-3", "crib-07", environ={})


def test_missing_or_open_site_key_stops_the_start(provisioned: tuple[BackendKeys, Path]) -> None:
    _, creds = provisioned
    (creds / "site-key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_cabinet_privacy(PrivacyConfig(), "hangar-3", "crib-07", credentials_dir=creds)
    (creds / "site-key").unlink()
    with pytest.raises(KeyFileError, match="not found"):
        load_cabinet_privacy(PrivacyConfig(), "hangar-3", "crib-07", credentials_dir=creds)


def test_rotation_with_two_signing_keys_and_duplicate_kid_refused(
    provisioned: tuple[BackendKeys, Path], tmp_path: Path
) -> None:
    keys, creds = provisioned
    new = generate_backend_keys(tmp_path / "backend2", signing_kid="sig2")
    shutil.copy2(tmp_path / "backend2" / "signing.pub", creds / "backend-sign-2.pub")
    cfg = PrivacyConfig(signing_public_keys=[Path("backend-sign.pub"), Path("backend-sign-2.pub")])
    cab = load_cabinet_privacy(cfg, "hangar-3", "crib-07", credentials_dir=creds)
    now = datetime.now(UTC)
    doc = allow_list_doc("hangar-3", "*", 2, now + timedelta(hours=1), {})
    assert cab.verifier.verify(sign_document(new.signing_private, "sig2", doc), "allow-list", now)
    assert (
        cab.verifier.verify(sign_document(keys.signing_private, "sig1", doc), "allow-list", now).kid
        == "sig1"
    )

    dup = PrivacyConfig(signing_public_keys=[Path("backend-sign.pub"), Path("backend-sign.pub")])
    with pytest.raises(KeyFileError, match="appears twice"):
        load_cabinet_privacy(dup, "hangar-3", "crib-07", credentials_dir=creds)


def test_unknown_keys_in_section_are_refused() -> None:
    with pytest.raises(ValueError, match="extra"):
        PrivacyConfig.model_validate({"site_key": "x", "sitekey": "typo"})
