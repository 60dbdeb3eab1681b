"""Badge pseudonyms: format, stability, canonicalization, separation, key files, no leaks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.privacy.pseudonym import (
    KeyFileError,
    Pseudonymizer,
    SiteKey,
    canonical_badge_id,
    is_pseudonym,
    load_site_key,
    write_site_key,
)
from drivers.errors import CabinetError, PermanentError

KEY = bytes(range(32))
PSEUDONYM_RE = re.compile(r"^p1\.[a-z0-9][a-z0-9_-]{0,15}\.[a-z2-7]{26}$")
# A raw id that is easy to spot anywhere it leaks (upper and lower case forms).
SECRET_BADGE = "00C0FFEE1234"


@pytest.fixture
def pseudo() -> Pseudonymizer:
    return Pseudonymizer("hangar-3", "s1", KEY)


def test_format(pseudo: Pseudonymizer) -> None:
    p = pseudo.badge("0012ab")
    assert PSEUDONYM_RE.fullmatch(p)
    assert p.startswith("p1.s1.")
    assert is_pseudonym(p)
    assert pseudo.kid == "s1"


def test_matches_the_documented_derivation(pseudo: Pseudonymizer) -> None:
    """Recompute docs/privacy.md by hand: HKDF(site key) then HMAC over the canonical id."""
    k = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cabinet-agent/site\x00hangar-3",
        info=b"badge-pseudonym/v1",
    ).derive(KEY)
    mac = hmac.new(k, b"badge/v1\x00" + b"12AB", hashlib.sha256).digest()[:16]
    expected = "p1.s1." + base64.b32encode(mac).decode().rstrip("=").lower()
    assert pseudo.badge("0012ab") == expected


def test_stable_across_instances() -> None:
    a = Pseudonymizer("hangar-3", "s1", KEY).badge("12AB34CD56")
    b = Pseudonymizer("hangar-3", "s1", KEY).badge("12AB34CD56")
    assert a == b


def test_two_reader_types_map_the_same_card_to_one_pseudonym(pseudo: Pseudonymizer) -> None:
    # EM4100 frame payload (10 hex, leading zeros) vs. a line reader ("0012ab\r\n").
    em4100 = pseudo.badge("00000012AB")
    line_reader = pseudo.badge("0012ab\r\n")
    assert em4100 == line_reader == pseudo.badge("12:AB") == pseudo.badge("0x12ab")
    assert pseudo.badge("12AC") != em4100


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("0012ab", b"12AB"),
        (" 00 12 AB ", b"12AB"),
        ("12-ab-cd", b"12ABCD"),
        ("0000", b"0"),
        ("0x00ff", b"FF"),
    ],
)
def test_canonical_form(raw: str, canonical: bytes) -> None:
    assert canonical_badge_id(raw) == canonical


def test_site_separation() -> None:
    a = Pseudonymizer("hangar-3", "s1", KEY).badge("0012ab")
    b = Pseudonymizer("hangar-4", "s1", KEY).badge("0012ab")
    assert a != b
    assert a.split(".")[2] != b.split(".")[2]


def test_key_separation() -> None:
    a = Pseudonymizer("hangar-3", "s1", KEY).badge("0012ab")
    b = Pseudonymizer("hangar-3", "s1", bytes(32)).badge("0012ab")
    assert a != b


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 6))
def test_any_hex_badge_gives_a_wellformed_pseudonym(number: int, zeros: int) -> None:
    pseudo = Pseudonymizer("hangar-3", "s1", KEY)
    p = pseudo.badge("0" * zeros + f"{number:x}")
    assert PSEUDONYM_RE.fullmatch(p)
    assert p == pseudo.badge(f"{number:X}")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "12G4" + SECRET_BADGE,
        SECRET_BADGE + "Z",
        SECRET_BADGE * 10,  # longer than 64 hex digits
        SECRET_BADGE + "\x00",
        "١٢٣" + SECRET_BADGE,  # non-ASCII digits
    ],
)
def test_invalid_ids_raise_without_the_raw_id(pseudo: Pseudonymizer, raw: str) -> None:
    with pytest.raises(ValueError) as info:
        pseudo.badge(raw)
    text = str(info.value) + repr(info.value)
    assert SECRET_BADGE not in text.upper()
    assert "C0FFEE" not in text.upper()
    assert "12G4" not in text


def test_raw_id_absent_from_repr_and_logs(
    pseudo: Pseudonymizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = pseudo.badge(SECRET_BADGE)
    with pytest.raises(ValueError):
        pseudo.badge(SECRET_BADGE + "!")
    assert any(r.name == "agent.privacy.pseudonym" for r in caplog.records)
    for text in (repr(pseudo), str(pseudo), p, caplog.text):
        assert "C0FFEE" not in text.upper()
    assert KEY.hex() not in repr(pseudo)


def test_non_string_badge_is_a_type_error(pseudo: Pseudonymizer) -> None:
    with pytest.raises(TypeError):
        pseudo.badge(0x12AB)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "s",
    [
        "p1.s1.abc",
        "p4.s1.abcdefghijklmnopqrstuvwxyz",
        "p1.S1.abcdefghijklmnopqrstuvwxyz",
        "p1.s1.abcdefghijklmnopqrstuvwxy1",
        "p1..abcdefghijklmnopqrstuvwxyz",
        "0012ab",
        "",
    ],
)
def test_is_pseudonym_rejects(s: str) -> None:
    assert not is_pseudonym(s)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="site id"):
        Pseudonymizer("", "s1", KEY)
    with pytest.raises(ValueError, match="kid"):
        Pseudonymizer("hangar-3", "S.1", KEY)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Pseudonymizer("hangar-3", "s1", b"short")


# --- key files ------------------------------------------------------------------------------


def test_key_file_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    write_site_key(path, "s7", KEY)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_site_key(path) == SiteKey("s7", KEY)
    pseudo = Pseudonymizer.from_key_file("hangar-3", path)
    assert pseudo.kid == "s7"
    assert pseudo.badge("0012ab") == Pseudonymizer("hangar-3", "s7", KEY).badge("12ab")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_open_to_others_is_refused_with_chmod_advice(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.key"
    write_site_key(path, "s1", KEY)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        load_site_key(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert base64.b64encode(KEY).decode() not in message
    assert isinstance(info.value, PermanentError)
    assert isinstance(info.value, CabinetError)
    os.chmod(path, 0o600)
    assert load_site_key(path) == SiteKey("s1", KEY)


def test_key_file_problems_are_named_without_key_material(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    b64 = base64.b64encode(KEY).decode()
    cases = {
        "not a valid TOML": f"key = {b64}\n",
        "kind": f'kind = "x"\nkid = "s1"\nkey = "{b64}"\n',
        "kid must match": f'kind = "site-key"\nkid = "UPPER"\nkey = "{b64}"\n',
        "base64": 'kind = "site-key"\nkid = "s1"\nkey = "!!!"\n',
        "32 bytes": 'kind = "site-key"\nkid = "s1"\nkey = "AAAA"\n',
    }
    for expected, text in cases.items():
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(KeyFileError, match=expected) as info:
            load_site_key(path)
        assert b64 not in str(info.value)
    with pytest.raises(KeyFileError, match="not found"):
        load_site_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_site_key(tmp_path)


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    write_site_key(real, "s1", KEY)
    link = tmp_path / "site.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_site_key(link)


def _set_acl(path: Path, *entries: tuple[int, int, int]) -> None:
    """Write a POSIX access ACL xattr (what setfacl does), mask = union of named entries."""
    nobody = 0xFFFFFFFF
    named = [e for e in entries if e[0] in (0x02, 0x08)]
    mask = 0
    for _, perm, _ in named:
        mask |= perm
    full = [(0x01, 0o4, nobody), *entries, (0x10, mask, nobody), (0x20, 0, nobody)]
    full.sort(key=lambda e: (e[0], e[2]))
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in full)
    os.setxattr(path, "system.posix_acl_access", data)


def test_systemd_credential_acl_for_this_user_is_accepted(tmp_path: Path) -> None:
    """LoadCredential= writes 0400 + user:<service>:r; the mode then reads 0440."""
    path = tmp_path / "site.key"
    write_site_key(path, "s1", KEY)
    os.chmod(path, 0o400)
    _set_acl(path, (0x02, 0o4, os.geteuid()), (0x04, 0, 0xFFFFFFFF))
    assert path.stat().st_mode & 0o777 == 0o440
    assert load_site_key(path) == SiteKey("s1", KEY)


@pytest.mark.parametrize(
    ("entry", "who"),
    [
        ((0x02, 0o4, 4242), "user 4242"),
        ((0x08, 0o4, 4343), "group 4343"),
        ((0x04, 0o4, 0xFFFFFFFF), "the owning group"),
    ],
)
def test_acl_granting_anyone_else_is_refused(
    tmp_path: Path, entry: tuple[int, int, int], who: str
) -> None:
    path = tmp_path / "site.key"
    write_site_key(path, "s1", KEY)
    os.chmod(path, 0o400)
    # Always grant this user too, so the mask is r and only the entry under test leaks.
    base = [(0x02, 0o4, os.geteuid())]
    if entry[0] != 0x04:
        base.append((0x04, 0, 0xFFFFFFFF))
    _set_acl(path, entry, *base)
    with pytest.raises(KeyFileError, match=who) as info:
        load_site_key(path)
    assert f"setfacl -b {path} && chmod 600 {path}" in str(info.value)


def test_the_pseudonym_shape_uses_the_key_id_rule_of_the_key_files() -> None:
    """One pseudonym shape (agent.domain.events) for the engine, the events and the privacy
    layer; its key-id part is the key files' rule, so a kid one accepts the other does too."""
    from agent.domain.events import PSEUDONYM_BODY
    from agent.privacy.keyfile import KID_PATTERN

    assert rf"p[123]\.{KID_PATTERN}\.[a-z2-7]{{26}}" == PSEUDONYM_BODY
