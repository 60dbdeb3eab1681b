"""Backend key material: generated files, modes, reload, and end-to-end use of each key."""

from __future__ import annotations

import os
import stat
import struct
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.privacy.envelope import EnvelopeHeader, Opener, Sealer
from agent.privacy.keyfile import KeyFileError, write_key_file
from agent.privacy.keys import (
    KIND_HPKE_PUBLIC,
    KIND_SIGNING_PUBLIC,
    load_hpke_public,
    load_signing_public,
)
from agent.privacy.pseudonym import Pseudonymizer
from agent.privacy.signed import DocumentVerifier
from backend.keys import BackendKeys, generate_backend_keys, load_backend_keys
from backend.signing import allow_list_doc, sign_document

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
    assert text == (
        "BackendKeys(hpke_kid='hpke1', signing_kid='sig1', site_kid='s1', "
        "site_argon2=Argon2Params(memory_kib=7168, iterations=6, lanes=1), site_tpm=False)"
    )
    assert keys.site.key.hex() not in repr(keys.site)
    assert isinstance(keys, BackendKeys)


def test_regenerate_replaces_files_atomically(tmp_path: Path) -> None:
    first = generate_backend_keys(tmp_path)
    second = generate_backend_keys(tmp_path)
    assert load_backend_keys(tmp_path).site_key == second.site_key != first.site_key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # no temp files left


# -- item 7 of #9: key and trust files nobody else can change ---------------------------------


@pytest.mark.parametrize("name", ["signing.pub", "backend-hpke.pub", "signing.key"])
@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664])
def test_key_files_writable_by_others_are_refused(tmp_path: Path, name: str, mode: int) -> None:
    generate_backend_keys(tmp_path)
    os.chmod(tmp_path / name, mode)
    with pytest.raises(KeyFileError) as err:
        load_backend_keys(tmp_path) if name.endswith(".key") else _load_public(tmp_path / name)
    assert "\n" not in str(err.value)
    # A secret file must not even be readable: its advice (chmod 600) cures writing too.
    fix = "chmod 600" if name.endswith(".key") else "chmod go-w"
    assert f"{fix} {tmp_path / name}" in str(err.value)


def test_a_writable_directory_above_a_key_file_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "deep" / "keys"
    keys.mkdir(parents=True)
    generate_backend_keys(keys)
    (tmp_path / "deep").chmod(0o777)  # anyone may rename keys/ away and plant their own
    with pytest.raises(KeyFileError, match=r"directory .*deep is writable by group/others"):
        load_signing_public(keys / "signing.pub")
    (tmp_path / "deep").chmod(0o1777)  # sticky (as /tmp): only owners rename their entries
    assert load_signing_public(keys / "signing.pub")[0] == "sig1"
    keys.chmod(0o775)
    with pytest.raises(KeyFileError, match=r"directory .*keys is writable by group/others"):
        load_signing_public(keys / "signing.pub")


def test_a_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    generate_backend_keys(tmp_path)
    os.chown(tmp_path / "backend-hpke.pub", 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        load_hpke_public(tmp_path / "backend-hpke.pub")
    os.chown(tmp_path / "backend-hpke.pub", 0, -1)
    assert load_hpke_public(tmp_path / "backend-hpke.pub")[0]
    os.chown(tmp_path, 65534, -1)
    with pytest.raises(KeyFileError, match="owned by uid 65534, who could replace"):
        load_hpke_public(tmp_path / "backend-hpke.pub")


def test_an_acl_granting_write_is_refused(tmp_path: Path) -> None:
    generate_backend_keys(tmp_path)
    path = tmp_path / "signing.pub"
    # user:65534:rw- with mask rw-: mode shows 0664-ish group bits, the ACL names the writer.
    entries = [(0x01, 0o6, 0xFFFFFFFF), (0x02, 0o6, 65534), (0x04, 0o4, 0xFFFFFFFF)]
    entries += [(0x10, 0o6, 0xFFFFFFFF), (0x20, 0o4, 0xFFFFFFFF)]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", blob)
    except OSError as err:  # pragma: no cover - the CI filesystem supports ACLs
        pytest.fail(f"cannot set an ACL on {path}: {err}")
    with pytest.raises(KeyFileError, match="user 65534 write it"):
        load_signing_public(path)


def _load_public(path: Path) -> object:
    if path.name == "signing.pub":
        return load_signing_public(path)
    return load_hpke_public(path)


# -- weak public keys (hostile finding: an all-zero signing key accepted forged documents) ------

_P = 2**255 - 19
_SMALL_ORDER_ED25519 = {
    "zero (order 4)": bytes(32),
    "identity (order 1)": (1).to_bytes(32, "little"),
    "(0, -1) (order 2)": (_P - 1).to_bytes(32, "little"),
    "order 8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order 8, other": bytes.fromhex(
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
    ),
    "non-canonical y = p": _P.to_bytes(32, "little"),
}


@pytest.mark.parametrize("name", sorted(_SMALL_ORDER_ED25519))
def test_small_order_signing_keys_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "signing.pub"
    write_key_file(path, KIND_SIGNING_PUBLIC, "sig1", _SMALL_ORDER_ED25519[name], secret=False)
    with pytest.raises(KeyFileError, match="anyone could forge documents"):
        load_signing_public(path)


def test_an_all_zero_signing_key_would_verify_a_forged_signature() -> None:
    """Why the check exists: R = identity, S = 0 needs no private key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = Ed25519PublicKey.from_public_bytes(bytes(32))
    forged = (1).to_bytes(32, "little") + bytes(32)
    accepted = 0
    for n in range(64):  # the cofactorless check passes for some messages
        try:
            key.verify(forged, f"allow-list v{n}".encode())
            accepted += 1
        except InvalidSignature:
            pass
    assert accepted > 0


def test_small_order_hpke_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "backend-hpke.pub"
    write_key_file(path, KIND_HPKE_PUBLIC, "hpke1", bytes(32), secret=False)
    with pytest.raises(KeyFileError, match="every event sealed to it could be read"):
        load_hpke_public(path)


def test_real_keys_still_load(tmp_path: Path) -> None:
    keys = generate_backend_keys(tmp_path)
    for _ in range(20):
        assert load_signing_public(tmp_path / "signing.pub")[0] == keys.signing_kid
    assert load_hpke_public(tmp_path / "backend-hpke.pub")[0] == keys.hpke_kid


def test_a_fifo_planted_as_a_key_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "signing.pub")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_signing_public(tmp_path / "signing.pub")
