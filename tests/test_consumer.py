"""cabinet-consumer: decoding, dedup, gaps, the CLI sub-commands, shared subscriptions."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.privacy.envelope import EnvelopeError, EnvelopeHeader, Opener
from agent.privacy.pseudonym import P2_DEFAULT, Argon2Params, Pseudonymizer, load_site_key
from agent.privacy.signed import ALLOW_LIST, ASSET_REGISTRY, DocumentVerifier
from backend.consumer import EventDecoder, SeqTracker
from backend.keys import load_backend_keys
from tests.delivery_helpers import (
    CABINET,
    SITE,
    backend,
    plaintext_for,
    sealed_rows,
    sealer_for,
)

ROOT = Path(__file__).resolve().parent.parent
TOPIC = f"cabinets/v1/{SITE}/{CABINET}/events"


def _cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.consumer", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


# ---------------------------------------------------------------- decoder


def test_decoder_opens_dedups_and_reports_gaps(tmp_path: Path) -> None:
    keys = backend(tmp_path / "b")
    rows = {r.seq: r for r in sealed_rows(sealer_for(keys), 1, 6)}
    gaps: list[tuple[str, int, int]] = []
    decoder = EventDecoder(
        Opener({keys.hpke_kid: keys.hpke_private}), on_gap=lambda c, a, b: gaps.append((c, a, b))
    )
    for seq in (1, 2, 5, 2, 3, 6, 5):
        decoder.handle(TOPIC, rows[seq].envelope)
    assert decoder.stats.delivered == 5
    assert decoder.stats.duplicates == 2
    assert gaps == [(f"{SITE}/{CABINET}", 3, 4)]
    assert decoder.gaps() == {f"{SITE}/{CABINET}": [(4, 4)]}
    ev = decoder.handle(TOPIC, rows[4].envelope)
    assert ev is not None
    assert ev.plaintext == plaintext_for(CABINET, 4, rows[4].event_id)
    assert ev.to_json()["event"]["seq"] == 4
    assert decoder.gaps() == {}


def test_decoder_refuses_tampering_and_misrouting(tmp_path: Path) -> None:
    keys = backend(tmp_path / "b")
    row = sealed_rows(sealer_for(keys), 1, 1)[0]
    decoder = EventDecoder(Opener({keys.hpke_kid: keys.hpke_private}))
    tampered = bytearray(row.envelope)
    tampered[-1] ^= 1
    with pytest.raises(EnvelopeError, match="authentication"):
        decoder.handle(TOPIC, bytes(tampered))
    with pytest.raises(EnvelopeError, match="arrived on"):
        decoder.handle(f"cabinets/v1/{SITE}/other-cab/events", row.envelope)
    # A body whose ids disagree with the authenticated header is refused too.
    eid = uuid.uuid4()
    header = EnvelopeHeader(keys.hpke_kid, CABINET, 7, eid)
    lying = sealer_for(keys).seal(header, plaintext_for(CABINET, 8, eid))
    with pytest.raises(EnvelopeError, match="seq in the body"):
        decoder.handle(TOPIC, lying)
    eid = uuid.uuid4()
    header = EnvelopeHeader(keys.hpke_kid, CABINET, 9, eid)
    body = {"event_id": str(eid), "seq": 9, "cabinet_id": CABINET, "site_id": "elsewhere"}
    other_site = sealer_for(keys).seal(header, json.dumps(body).encode())
    with pytest.raises(EnvelopeError, match="site_id"):
        decoder.handle(TOPIC, other_site)
    assert decoder.stats.invalid == 4
    assert decoder.stats.delivered == 0


def _sealed_v2(keys: Any, seq: int, epoch: bytes, eid: uuid.UUID | None = None) -> bytes:
    eid = eid or uuid.uuid4()
    header = EnvelopeHeader(keys.hpke_kid, CABINET, seq, eid, 2, epoch)
    return sealer_for(keys).seal(header, plaintext_for(CABINET, seq, eid))


def test_decoder_tracks_seqs_per_epoch_and_flags_a_reused_seq(tmp_path: Path) -> None:
    keys = backend(tmp_path / "b")
    gaps: list[tuple[str, int, int]] = []
    decoder = EventDecoder(
        Opener({keys.hpke_kid: keys.hpke_private}), on_gap=lambda c, a, b: gaps.append((c, a, b))
    )
    old, new = bytes.fromhex("00000000000000aa"), bytes.fromhex("00000000000000bb")
    for seq in (1, 2, 3):
        decoder.handle(TOPIC, _sealed_v2(keys, seq, old))
    # A new epoch jumps past the old reservation: not a gap.
    for seq in (1003, 1004):
        ev = decoder.handle(TOPIC, _sealed_v2(keys, seq, new))
        assert ev is not None
        assert ev.to_json()["epoch"] == new.hex()
    assert gaps == []
    assert decoder.gaps() == {}
    # Same epoch, same seq, another event id: delivered (never lose an event) but flagged.
    reused = decoder.handle(TOPIC, _sealed_v2(keys, 2, old))
    assert reused is not None
    assert decoder.stats.seq_conflicts == 1
    # A plain re-delivery (same event id) is a duplicate, not a conflict.
    eid = uuid.uuid4()
    envelope = _sealed_v2(keys, 1005, new, eid)
    decoder.handle(TOPIC, envelope)
    assert decoder.handle(TOPIC, envelope) is None
    assert decoder.stats.seq_conflicts == 1
    assert decoder.stats.duplicates == 1


def test_seq_tracker_bounds_and_abandons() -> None:
    t = SeqTracker(low=10)
    assert t.add(13) == (11, 12)
    assert t.add(11) is None
    assert t.missing() == [(12, 12)]
    assert t.abandon_oldest_gap() == (12, 12)
    assert t.low == 13
    assert t.above == set()


# ---------------------------------------------------------------- CLI


def test_site_key_for_a_rotation_and_both_pseudonyms_of_a_badge(tmp_path: Path) -> None:
    """The next key of a rotation (p2, chosen cost) and a badge's old and new pseudonyms on one
    line, to list every person under both keys while the cabinets change over."""
    keydir = tmp_path / "keys"
    assert _cli("keygen", str(keydir)).returncode == 0
    new_key = keydir / "site-s2.key"
    proc = _cli("site-key", str(new_key), "--kid", "s2", "--memory-kib", "8192")
    assert proc.returncode == 0, proc.stderr
    assert "s2 (p2)" in proc.stdout
    assert new_key.stat().st_mode & 0o077 == 0
    site = load_site_key(new_key)
    assert (site.kid, site.argon2) == (
        "s2",
        Argon2Params(8192, P2_DEFAULT.iterations, P2_DEFAULT.lanes),
    )
    assert _cli("site-key", str(new_key), "--kid", "s3").returncode != 0, "never overwrites"
    bad = _cli("site-key", str(tmp_path / "x.key"), "--kid", "s3", "--memory-kib", "19")
    assert bad.returncode != 0
    assert "argon2id.memory_kib" in bad.stderr
    assert not (tmp_path / "x.key").exists()

    raw = "04A1B2C3D4"
    old_key = keydir / "site.key"
    proc = _cli(
        "pseudonym", "--site", SITE, "--site-key", str(old_key), "--site-key", str(new_key),
        stdin=f"{raw}\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    old_p, new_p = proc.stdout.split()
    assert old_p == Pseudonymizer.from_key_file(SITE, old_key).badge(raw)
    assert new_p == Pseudonymizer.from_key_file(SITE, new_key).badge(raw)
    assert (old_p[:6], new_p[:6]) == ("p2.s1.", "p2.s2.")
    assert raw not in proc.stdout + proc.stderr


def test_keygen_pseudonym_and_signing(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    proc = _cli("keygen", str(keydir))
    assert proc.returncode == 0, proc.stderr
    assert _cli("keygen", str(keydir)).returncode != 0, "refuses to overwrite keys"
    keys = load_backend_keys(keydir)
    assert (keydir / "backend-hpke.key").stat().st_mode & 0o077 == 0

    raw = "04A1B2C3D4"
    proc = _cli("pseudonym", "--site", SITE, "--keys", str(keydir), stdin=f"{raw}\nnot-hex\n")
    expected = Pseudonymizer.from_site_key(SITE, keys.site).badge(raw)
    assert proc.stdout.strip() == expected
    assert proc.returncode != 0, "a bad line is an error"
    assert raw not in proc.stdout + proc.stderr
    assert "not-hex" not in proc.stderr, "bad input is never echoed"

    expires = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (tmp_path / "allow.toml").write_text(
        f'site = "{SITE}"\ncabinet = "{CABINET}"\nversion = 4\nexpires = "{expires}"\n'
        f'[entries]\n"{expected}" = ["technician", "supervisor"]\n'
    )
    out = tmp_path / "allow.signed.json"
    proc = _cli(
        "sign-allow-list", str(tmp_path / "allow.toml"), "--keys", str(keydir), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    verifier = DocumentVerifier({keys.signing_kid: keys.signing_public}, SITE, CABINET)
    doc = verifier.verify(out.read_bytes(), ALLOW_LIST, datetime.now(UTC))
    assert doc.version == 4
    assert list(doc.body["entries"][expected]) == ["supervisor", "technician"]

    (tmp_path / "reg.json").write_text(
        json.dumps(
            {
                "site": SITE,
                "cabinet": "*",
                "version": 1,
                "expires_days": 3,
                "assets": [{"epc": "e2801160", "asset_id": "TW-1", "name": "torque wrench"}],
            }
        )
    )
    proc = _cli("sign-registry", str(tmp_path / "reg.json"), "--keys", str(keydir))
    assert proc.returncode == 0, proc.stderr
    reg = verifier.verify(proc.stdout.strip().encode(), ASSET_REGISTRY, datetime.now(UTC))
    assert reg.body["assets"][0]["epc"] == "e2801160"

    # What the cabinet would refuse cannot be signed: an asset without its asset_id.
    (tmp_path / "noid.json").write_text(
        json.dumps(
            {"site": SITE, "version": 2, "assets": [{"epc": "e2801160", "name": "torque wrench"}]}
        )
    )
    proc = _cli("sign-registry", str(tmp_path / "noid.json"), "--keys", str(keydir))
    assert proc.returncode == 65, proc.stderr
    assert "asset_id" in proc.stderr
    assert proc.stdout == ""

    (tmp_path / "bad.toml").write_text(
        f'site = "{SITE}"\nversion = 1\n[entries]\n"{raw}" = ["x"]\n'
    )
    proc = _cli("sign-allow-list", str(tmp_path / "bad.toml"), "--keys", str(keydir))
    assert proc.returncode != 0
    assert "pseudonyms" in proc.stderr


def test_consume_refuses_plaintext_off_box(tmp_path: Path) -> None:
    backend(tmp_path / "keys")
    proc = _cli("consume", "--host", "10.9.8.7", "--keys", str(tmp_path / "keys"))
    assert proc.returncode != 0
    assert "plaintext" in proc.stderr


def test_signing_refuses_a_document_the_cabinets_would_never_receive(tmp_path: Path) -> None:
    """Above the cabinets' [mqtt] max_command_bytes the broker drops it (MQTT 5) or the cabinet
    refuses it, and the old allow-list silently stays: the tool says so instead (exit 65)."""
    keydir = tmp_path / "keys"
    assert _cli("keygen", str(keydir)).returncode == 0
    keys = load_backend_keys(keydir)
    # Only the size matters here: 30,000 pseudonyms under the p1 scheme (microseconds each)
    # are as large as p2 ones (tens of milliseconds each).
    pseudo = Pseudonymizer(SITE, keys.site_kid, keys.site_key)
    expires = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries = "".join(f'"{pseudo.badge(f"{n:010X}")}" = ["user"]\n' for n in range(30_000))
    (tmp_path / "big.toml").write_text(
        f'site = "{SITE}"\ncabinet = "{CABINET}"\nversion = 5\nexpires = "{expires}"\n'
        f"[entries]\n{entries}"
    )
    proc = _cli("sign-allow-list", str(tmp_path / "big.toml"), "--keys", str(keydir))
    assert proc.returncode == 65
    assert proc.stdout == ""
    assert "above --max-bytes 1048576" in proc.stderr
    ok = _cli(
        "sign-allow-list", str(tmp_path / "big.toml"), "--keys", str(keydir),
        "--max-bytes", str(4 * 1024 * 1024),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout) > 1024 * 1024
