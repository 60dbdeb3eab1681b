"""Backend key material: generated files, modes, reload, and end-to-end use of each key."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer
from agent.privacy.keyfile import KeyFileError
from agent.privacy.keys import (
    BackendKeys,
    generate_backend_keys,
    load_backend_keys,
    load_hpke_public,
    load_signing_public,
)
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import DocumentVerifier, allow_list_doc, sign_document

FILES = {
    "backend-hpke.key": 0o600,
    "backend-hpke.pub": 0o644,
    "signing.key": 0o600,
    "signing.pub": 0o644,
    "site.key": 0o600,
}


def test_generate_writes_five_files_with_correct_modes(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    old = os.umask(0o002)  # a lax umask must not loosen the secret files
    try:
        generate_backend_keys(out)
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == FILES
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_load_back_and_use_every_key(tmp_path: Path) -> None:
    """What the cabinet gets (public keys, site key) interoperates with what the backend keeps."""
    keys = generate_backend_keys(tmp_path, hpke_kid="2026-a", signing_kid="sig7", site_kid="s3")
    loaded = load_backend_keys(tmp_path)
    assert (loaded.hpke_kid, loaded.signing_kid, loaded.site_kid) == ("2026-a", "sig7", "s3")
    assert loaded.site_key == keys.site_key

    hpke_kid, hpke_public = load_hpke_public(tmp_path / "backend-hpke.pub")
    header = EnvelopeHeader(hpke_kid, "crib-07", 1, uuid.uuid4())
    envelope = Sealer(hpke_public, hpke_kid).seal(header, b"{}")
    assert Opener({loaded.hpke_kid: loaded.hpke_private}).open(envelope) == (header, b"{}")

    now = datetime.now(UTC)
    pseudo = Pseudonymizer.from_key_file("hangar-3", tmp_path / "site.key")
    doc = allow_list_doc("hangar-3", "*", 1, now + timedelta(days=1), {pseudo.badge("12ab"): []})
    raw = sign_document(loaded.signing_private, loaded.signing_kid, doc)
    signing_kid, signing_public = load_signing_public(tmp_path / "signing.pub")
    verifier = DocumentVerifier({signing_kid: signing_public}, "hangar-3", "crib-07")
    assert verifier.verify(raw, "allow-list", now).kid == "sig7"


def test_secret_files_opened_up_are_refused(tmp_path: Path) -> None:
    generate_backend_keys(tmp_path)
    os.chmod(tmp_path / "signing.key", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_backend_keys(tmp_path)


def test_public_files_load_with_any_mode_but_not_as_the_wrong_kind(tmp_path: Path) -> None:
    generate_backend_keys(tmp_path)
    os.chmod(tmp_path / "signing.pub", 0o444)
    assert load_signing_public(tmp_path / "signing.pub")[0] == "sig1"
    with pytest.raises(KeyFileError, match="expected kind"):
        load_hpke_public(tmp_path / "signing.pub")
    with pytest.raises(KeyFileError, match="expected kind"):
        load_signing_public(tmp_path / "backend-hpke.key")


def test_repr_shows_no_key_material(tmp_path: Path) -> None:
    keys = generate_backend_keys(tmp_path)
    text = repr(keys)
    assert keys.site_key.hex() not in text
    assert "site_key" not in text
    assert text == "BackendKeys(hpke_kid='hpke1', signing_kid='sig1', site_kid='s1')"
    assert isinstance(keys, BackendKeys)


def test_regenerate_replaces_files_atomically(tmp_path: Path) -> None:
    first = generate_backend_keys(tmp_path)
    second = generate_backend_keys(tmp_path)
    assert load_backend_keys(tmp_path).site_key == second.site_key != first.site_key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no temp files left
