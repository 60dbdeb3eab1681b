"""p3 pseudonyms: the site key held in a TPM (issue 11, item 2), against software TPMs.

Each test starts its own swtpm (tests/tpm_fixtures.py: own state directory, own loopback
ports). The backend computes p3 in software from the site key it keeps; a cabinet's TPM
computes the HMAC step with the key wrapped for it, and its disk holds only the TPM's blob.
The end-to-end tests with the real agent are in tests/test_privacy_tpm_agent.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.privacy.enrolment import (
    import_into,
    read_site_key_import,
    read_storage_key,
    wrap_for_cabinet,
    write_site_key_import,
    write_storage_key,
)
from agent.privacy.keyfile import KeyFileError, write_key_text
from agent.privacy.pseudonym import (
    Argon2Params,
    BadgePseudonyms,
    Pseudonymizer,
    SiteKey,
    TpmSiteKey,
    is_pseudonym,
    load_cabinet_site_key,
    load_site_key,
    write_site_key,
    write_tpm_site_key,
)
from agent.privacy.tpm import TpmError, TpmHmacKey, TpmKeyBlob, storage_parent
from tests.tpm_fixtures import SwTpm

SITE = "hangar-3"
KEY = bytes(range(32))
LOW = Argon2Params(memory_kib=4096, iterations=1, lanes=1)  # the cheapest allowed: fast tests
P3 = SiteKey("s3", KEY, LOW, tpm=True)
BADGES = ["00C0FFEE1234", "12ab", "04A1B2C3D4"]


@pytest.fixture
def tpm_a(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm(tmp_path / "tpm-a") as tpm:
        yield tpm


@pytest.fixture
def tpm_b(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm(tmp_path / "tpm-b") as tpm:
        yield tpm


def _enrol(tpm: SwTpm, site: SiteKey = P3) -> TpmSiteKey:
    """The three enrolment steps, in process: storage key, wrap (backend), import (cabinet)."""
    return import_into(tpm.tcti, wrap_for_cabinet(SITE, site, storage_parent(tpm.tcti)))


def test_p3_matches_the_documented_derivation() -> None:
    """Recompute docs/privacy.md §1 (p3) by hand: HKDF HMAC key, HMAC of the badge, Argon2id
    with that HMAC as its secret."""
    h = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cabinet-agent/site\x00hangar-3",
        info=b"badge-pseudonym/v3/tpm-hmac",
    ).derive(KEY)
    m = hmac.new(h, b"badge/v3\x00" + b"12AB", hashlib.sha256).digest()
    tag = Argon2id(
        salt=hashlib.sha256(b"cabinet-agent/badge-pseudonym/v3\x00hangar-3").digest()[:16],
        length=16,
        iterations=LOW.iterations,
        lanes=LOW.lanes,
        memory_cost=LOW.memory_kib,
        ad=b"p3.s3",
        secret=m,
    ).derive(b"badge/v3\x00" + b"12AB")
    expected = "p3.s3." + base64.b32encode(tag).decode().rstrip("=").lower()
    pseudo = Pseudonymizer.from_site_key(SITE, P3)
    assert pseudo.badge("0012ab") == expected
    assert is_pseudonym(expected)
    assert (pseudo.scheme, pseudo.prefix) == ("p3", "p3.s3")
    # Separated from p2 under the same key, parameters and kid.
    assert (
        pseudo.badge("12ab").split(".")[2]
        != Pseudonymizer(SITE, "s3", KEY, LOW).badge("12ab").split(".")[2]
    )


def test_the_tpm_computes_what_the_backend_computes_in_software(tpm_a: SwTpm) -> None:
    key = _enrol(tpm_a)
    device = TpmHmacKey(tpm_a.tcti, key.blob)
    try:
        held = Pseudonymizer.held_in(SITE, key.kid, key.argon2, device)
        software = Pseudonymizer.from_site_key(SITE, P3)
        for badge in BADGES:
            assert held.badge(badge) == software.badge(badge)
    finally:
        device.close()


def test_key_files_travel_and_the_cabinets_holds_no_key(tpm_a: SwTpm, tmp_path: Path) -> None:
    """The files of the enrolment round-trip; none the cabinet keeps holds a key byte."""
    site_file = tmp_path / "backend-site.key"
    write_site_key(site_file, P3.kid, P3.key, P3.argon2, tpm=True)
    assert load_site_key(site_file) == P3
    storage = tmp_path / "crib-07.tpm-storage"
    write_storage_key(storage, storage_parent(tpm_a.tcti))
    wrapped = tmp_path / "crib-07.site-key-import"
    write_site_key_import(wrapped, wrap_for_cabinet(SITE, P3, read_storage_key(storage)))
    imp = read_site_key_import(wrapped)
    key_file = tmp_path / "site-key.tpm"
    write_tpm_site_key(key_file, import_into(tpm_a.tcti, imp))
    loaded = load_cabinet_site_key(key_file)
    assert isinstance(loaded, TpmSiteKey)
    assert (loaded.prefix, loaded.site_id, loaded.argon2) == ("p3.s3", SITE, LOW)
    assert (key_file.stat().st_mode & 0o777) == 0o600
    # The backend's tools refuse the cabinet's file: it holds no key to compute with.
    with pytest.raises(KeyFileError, match="held in a cabinet's TPM"):
        load_site_key(key_file)
    hmac_key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"cabinet-agent/site\x00hangar-3",
        info=b"badge-pseudonym/v3/tpm-hmac",
    ).derive(KEY)
    for path in (storage, wrapped, key_file):
        raw = path.read_bytes()
        for secret in (KEY, hmac_key):
            assert secret not in raw
            assert base64.b64encode(secret) not in raw
            assert secret.hex().encode() not in raw


def test_a_blob_is_useless_on_another_tpm(tpm_a: SwTpm, tpm_b: SwTpm) -> None:
    """The disk copied to another controller: its TPM loads nothing, imports nothing."""
    key = _enrol(tpm_a)
    with pytest.raises(TpmError, match="made for another TPM") as info:
        TpmHmacKey(tpm_b.tcti, key.blob)
    assert "\n" not in str(info.value)
    imp = wrap_for_cabinet(SITE, P3, storage_parent(tpm_a.tcti))
    with pytest.raises(TpmError, match="wrapped for another TPM"):
        import_into(tpm_b.tcti, imp)
    # Not just our check: told the blob belongs here, the other TPM itself cannot unwrap it.
    forged = TpmKeyBlob(
        parent=_parent_name(tpm_b), public=key.blob.public, private=key.blob.private
    )
    with pytest.raises(TpmError, match="could not unwrap the key"):
        TpmHmacKey(tpm_b.tcti, forged)
    # And a damaged blob on its own TPM is refused the same way.
    private = bytearray(key.blob.private)
    private[-1] ^= 1
    with pytest.raises(TpmError, match="could not unwrap the key"):
        TpmHmacKey(tpm_a.tcti, TpmKeyBlob(key.blob.parent, key.blob.public, bytes(private)))


def test_an_absent_tpm_is_refused_with_a_reason(tmp_path: Path) -> None:
    with SwTpm(tmp_path / "gone") as tpm:
        tcti = tpm.tcti
        key = _enrol(tpm)
    for where in (tcti, f"device:{tmp_path}/no-tpm"):
        with pytest.raises(TpmError) as info:
            storage_parent(where)
        assert f"cannot reach the TPM at {where}" in str(info.value)
        assert "\n" not in str(info.value)
        with pytest.raises(TpmError, match=f"cannot reach the TPM at {where}"):
            TpmHmacKey(where, key.blob)
    # Not the object this agent makes (here: none at all) is refused before any TPM is asked.
    with pytest.raises(TpmError, match="not a cabinet-agent site key"):
        TpmHmacKey(tcti, TpmKeyBlob(key.blob.parent, b"\x00\x00", key.blob.private))


def test_the_key_keeps_working_in_dictionary_attack_lockout(tpm_a: SwTpm) -> None:
    """Someone else's wrong passwords put the TPM in lockout: the cabinet still derives (the
    key has no password to guess and is exempt, noDA), so nobody is locked out of it."""
    key = _enrol(tpm_a)
    _force_lockout(tpm_a)
    device = TpmHmacKey(tpm_a.tcti, key.blob)
    try:
        held = Pseudonymizer.held_in(SITE, key.kid, key.argon2, device)
        assert held.badge(BADGES[0]) == Pseudonymizer.from_site_key(SITE, P3).badge(BADGES[0])
    finally:
        device.close()


def test_a_tpm_restart_is_survived_by_reconnecting(tpm_a: SwTpm) -> None:
    """Power off the TPM: a derivation fails with a reason; back on, the next one works (the
    key is loaded again from its blob)."""
    key = _enrol(tpm_a)
    device = TpmHmacKey(tpm_a.tcti, key.blob)
    try:
        held = Pseudonymizer.held_in(SITE, key.kid, key.argon2, device)
        expected = Pseudonymizer.from_site_key(SITE, P3).badge(BADGES[1])
        assert held.badge(BADGES[1]) == expected
        port = tpm_a.port
        tpm_a.stop()
        with pytest.raises(TpmError, match="cannot reach the TPM") as info:
            held.badge(BADGES[1])
        assert BADGES[1] not in str(info.value)
        tpm_a.start(port)
        assert held.badge(BADGES[1]) == expected
    finally:
        device.close()


async def test_an_unanswering_tpm_fails_the_read_and_is_reported_once(tpm_a: SwTpm) -> None:
    key = _enrol(tpm_a)
    device = TpmHmacKey(tpm_a.tcti, key.blob)
    ring = BadgePseudonyms(SITE, Pseudonymizer.held_in(SITE, key.kid, key.argon2, device))
    told: list[tuple[str, str | None]] = []
    ring.on_device_problem = lambda prefix, reason: told.append((prefix, reason))
    try:
        expected = Pseudonymizer.from_site_key(SITE, P3).badge(BADGES[0])
        assert await ring.badge(BADGES[0]) == expected
        port = tpm_a.port
        tpm_a.stop()
        for _ in range(3):
            with pytest.raises(TpmError):
                await ring.badge(BADGES[0])
        assert len(told) == 1
        assert told[0][0] == "p3.s3"
        assert told[0][1] is not None
        assert "cannot reach the TPM" in told[0][1]
        assert ring.device_problems == {"p3.s3": told[0][1]}
        tpm_a.start(port)
        assert await ring.badge(BADGES[0]) == expected
        assert told[-1] == ("p3.s3", None)
        assert ring.device_problems == {}
    finally:
        ring.close()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda t: t.replace('source = "tpm"\n', ""), "key must be a base64 string"),
        (lambda t: t.replace('scheme = "p3"', 'scheme = "p2"'), 'must have scheme = "p3"'),
        (lambda t: t.replace('source = "tpm"', 'source = "hsm"'), 'source must be "file" or'),
        (lambda t: t.replace('site = "hangar-3"\n', ""), "site must be the site id"),
        (lambda t: t.split("[tpm]")[0], "tpm must be a table"),
        (lambda t: t.replace("private = ", "privat = "), "tpm.privat is not a known field"),
        (lambda t: t.replace('parent = "', 'parent = "zz'), "tpm.parent must be hexadecimal"),
        (lambda t: t + 'key = "' + base64.b64encode(KEY).decode() + '"\n', "tpm.key is not"),
        (lambda t: 'key = "AAAA"\n' + t, "must not hold a key"),
    ],
)
def test_bad_tpm_key_files_are_refused_naming_the_field(
    tmp_path: Path, change: object, says: str
) -> None:
    path = tmp_path / "site-key.tpm"
    blob = TpmKeyBlob(parent=b"\x00\x0b" + bytes(32), public=b"\x00\x02ab", private=b"\x00\x02cd")
    write_tpm_site_key(path, TpmSiteKey("s3", SITE, LOW, blob))
    assert callable(change)
    write_key_text(path, change(path.read_text()), secret=True)
    with pytest.raises(KeyFileError) as info:
        load_cabinet_site_key(path)
    assert says in str(info.value)
    assert str(path) in str(info.value)


# -- helpers ------------------------------------------------------------------------------


def _parent_name(tpm: SwTpm) -> bytes:
    from agent.privacy.tpm import parent_name

    return parent_name(storage_parent(tpm.tcti))


def _force_lockout(tpm: SwTpm) -> None:
    """One allowed failure, then a wrong password on a DA-protected object: lockout."""
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    import tpm2_pytss as t

    with t.ESAPI(tpm.tcti) as esapi:
        esapi.dictionary_attack_parameters(1, 1000, 1000, lock_handle=t.ESYS_TR.LOCKOUT)
        template = t.TPM2B_PUBLIC(
            t.TPMT_PUBLIC.parse(
                "hmac",
                objectAttributes=t.TPMA_OBJECT.SIGN_ENCRYPT
                | t.TPMA_OBJECT.USERWITHAUTH
                | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
                | t.TPMA_OBJECT.FIXEDTPM
                | t.TPMA_OBJECT.FIXEDPARENT,
            )
        )
        sensitive = t.TPM2B_SENSITIVE_CREATE(t.TPMS_SENSITIVE_CREATE(userAuth=b"right"))
        handle, *_ = esapi.create_primary(sensitive, template, t.ESYS_TR.OWNER)
        try:
            esapi.tr_set_auth(handle, b"wrong")
            with pytest.raises(t.TSS2_Exception):
                esapi.hmac(handle, b"x", t.TPM2_ALG.SHA256)
            esapi.tr_set_auth(handle, b"right")
            with pytest.raises(t.TSS2_Exception) as info:
                esapi.hmac(handle, b"x", t.TPM2_ALG.SHA256)
            assert info.value.error == t.TPM2_RC.LOCKOUT, "the TPM is not in lockout"
        finally:
            esapi.flush_context(handle)


def test_a_bad_tcti_is_a_config_error_naming_the_field() -> None:
    import tomllib

    from agent.config import ConfigError, parse_config
    from tests.daemon_rig import config_text

    text = config_text(Path("/tmp/x"), 9).replace(
        "[privacy]\n", '[privacy]\ntpm_tcti = "device /dev/tpmrm0; rm -rf"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    (problem,) = info.value.problems
    assert problem.startswith("privacy.tpm_tcti: ")
    assert "TPM TCTI must match" in problem
