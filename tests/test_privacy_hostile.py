"""Issue 11, a hostile tester's finding: a refused document's reason quoted its content.

The real ``cabinet-agent run`` process, simulated readers and door, a real mosquitto
(tests/scenario_harness.py). Whoever can publish on a cabinet's command topic (or a backend
bug) sends documents built to be refused with a badge number or a pseudonym in exactly the
place the refusal reason used to quote: a duplicate key, a fractional number, a non-ASCII key,
a validly signed document with a badge number for its issue time, an allow-list entry whose
roles are not a list. Every refusal is logged, kept for ``cabinetctl status`` and audited;
none of them may carry the badge number into the log, the database or the broker's files, nor
a pseudonym into a refusal (an erasure could not find it there: it is not a JSON string value).
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.control.client import ControlClient
from agent.privacy.signed import canonical_json
from backend.signing import allow_list_doc, erasure_doc, sign_document
from simulators.cabinet import Scenario, load_scenario
from tests.mqtt_fixtures import Mosquitto
from tests.pii import assert_no_raw_ids
from tests.scenario_harness import TIMEOUT_S, Rig, cabinet_rig
from tests.test_scenarios import SCENARIOS

DECIMAL_CARD = "4123456789"  # a Wiegand-style card number, as a decimal reader prints it


def _scenario() -> Scenario:
    base = load_scenario(next(p for p in SCENARIOS if p.stem == "plain-checkout"))
    return base.model_copy(update={"steps": [], "expect": []})


def _signed(rig: Rig, doc: dict[str, Any]) -> bytes:
    """Signed with the backend's real key, whatever the document holds (no backend check)."""
    sig = rig.keys.signing_private.sign(canonical_json(doc))
    wire = {"doc": doc, "kid": rig.keys.signing_kid, "sig": base64.b64encode(sig).decode()}
    return json.dumps(wire).encode()


def _doc(rig: Rig, body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    lay = rig.scenario.cabinet
    now = datetime.now(UTC).replace(microsecond=0)
    doc = {
        "kind": "allow-list",
        "site_id": lay.site_id,
        "cabinet_id": lay.cabinet_id,
        "version": 7,
        "issued_at": now.isoformat().replace("+00:00", "Z"),
        "expires_at": (now + timedelta(days=3)).isoformat().replace("+00:00", "Z"),
        "body": body,
    }
    doc.update(fields)
    return doc


async def _refusals(rig: Rig) -> list[dict[str, Any]]:
    async with ControlClient(rig.dir / "agent" / "ctl.sock", timeout_s=20.0) as client:
        result: dict[str, Any] = await client.call("audit.tail", {"n": 200})
    return [r for r in result["records"] if r["action"] == "document.refused"]


async def test_refused_documents_quote_no_badge_number_and_no_pseudonym(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with cabinet_rig(_scenario(), tmp_path, mosquitto, commission=False) as rig:
        alice_card = next(p.badge for p in rig.scenario.people if p.name == "alice")
        alice = rig.pseudonym("alice")
        kid = rig.keys.signing_kid
        hostile = [
            # Unsigned, refused while parsing: a duplicate key, a fraction, a non-ASCII key.
            b'{"doc": {"body": {"entries": {"CARD": [], "CARD": []}}}, "kid": "KID", "sig": "x"}'.replace(
                b"CARD", alice_card.encode()
            ).replace(b"KID", kid.encode()),
            b'{"doc": {"n": CARD.5}, "kid": "KID", "sig": "x"}'.replace(
                b"CARD", DECIMAL_CARD.encode()
            ).replace(b"KID", kid.encode()),
            json.dumps(
                {"doc": {"\u00e9" + alice_card: 1}, "kid": kid, "sig": "A" * 86 + "=="},
                ensure_ascii=False,
            ).encode(),
            # Validly signed: a badge number for a time; a pseudonym whose roles are no list.
            _signed(rig, _doc(rig, {"entries": {}}, issued_at=alice_card)),
            _signed(rig, _doc(rig, {"entries": {alice: "user"}})),
        ]
        before = len(await _refusals(rig))
        for wire in hostile:
            rig.publish_document("allow-list", wire)
        async with asyncio.timeout(TIMEOUT_S):
            while len(refused := await _refusals(rig)) < before + len(hostile):
                await asyncio.sleep(0.1)
        details = [r["details"]["detail"] for r in refused[before:]]
        assert len(set(details)) == len(hostile), [r["details"]["reason"] for r in refused]
        # The messages name the refusal only: a failure must not print a badge number.
        for i, detail in enumerate(details):
            assert alice_card.lower() not in detail.lower(), f"refusal {i} quotes the card"
            assert DECIMAL_CARD not in detail, f"refusal {i} quotes the card number"
            assert alice not in detail, f"refusal {i} quotes a pseudonym"
        assert alice not in rig.agent.log_text(), "a pseudonym reached the log"
    assert_no_raw_ids([rig.dir / "agent", mosquitto.dir], [alice_card])
    for path in (rig.dir / "agent").rglob("*"):
        if path.is_file():
            assert DECIMAL_CARD.encode() not in path.read_bytes(), path


async def test_the_log_names_nobody_even_at_debug(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The log (journald: kept by the host's rules, out of reach of retention and erasure)
    holds no pseudonym and no badge number at DEBUG either: a refused card, a door cycle with
    a check-out, an allow-list installed, someone erased. And the agent cannot dump core (its
    memory holds the badge being read and the site key)."""
    steps = ["badge mallory", "badge alice", "wait_unlock", "open", "take wrench", "close"]
    scenario = _scenario().model_copy(update={"steps": [*steps, "settle"]})
    extra = {"logging": {"level": "DEBUG"}}
    async with cabinet_rig(scenario, tmp_path, mosquitto, agent_extra=extra) as rig:
        events = await rig.play()
        assert {"access.denied", "session.opened", "item.checked_out"} <= {
            e["type"] for e in events
        }
        bob = rig.pseudonym("bob")
        lay = rig.scenario.cabinet
        now = datetime.now(UTC).replace(microsecond=0)
        entries = {
            rig.pseudonym(p.name): list(p.roles)
            for p in rig.scenario.people
            if p.listed and p.name != "bob"
        }
        rig.publish_document(
            "allow-list",
            sign_document(
                rig.keys.signing_private,
                rig.keys.signing_kid,
                allow_list_doc(
                    lay.site_id, lay.cabinet_id, 2, now + timedelta(days=3), entries, issued_at=now
                ),
            ),
        )
        await rig.agent.wait_log("installed allow-list version 2")
        rig.publish_document(
            "erasure",
            sign_document(
                rig.keys.signing_private,
                rig.keys.signing_kid,
                erasure_doc(
                    lay.site_id, lay.cabinet_id, 1, now + timedelta(days=3), [bob], issued_at=now
                ),
            ),
        )
        await rig.agent.wait_log("erasure version 1 applied")
        # A crash would not write its memory (a badge being read, the site key) to disk.
        assert rig.agent.proc is not None
        limits = Path(f"/proc/{rig.agent.proc.pid}/limits").read_text().splitlines()
        core = next(line for line in limits if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        log = rig.agent.log_text()
        assert " DEBUG " in log, "the log is not at DEBUG: the check would prove little"
        named = [p.name for p in (*rig.scenario.people,) if p.listed or p.name == "mallory"]
        leaked = [n for n in named if rig.pseudonym(n) in log]
        assert leaked == [], f"the log names {leaked} by pseudonym"
    assert_no_raw_ids([rig.dir / "agent" / "agent.log"], rig.raw_ids)
