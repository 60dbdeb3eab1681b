"""What the demo shows: its introduction, the story's steps, one line per event the backend
opened (the commissioning cycle's counted, not listed), and a summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from simulators.demo.provision import CABINET_FILES

if TYPE_CHECKING:
    from simulators.cabinet import AgentArtefacts, Scenario, Step

_STYLE = {
    "item.checked_out": "bold yellow",
    "item.returned": "bold green",
    "session.opened": "cyan",
    "session.closed": "cyan",
    "access.denied": "magenta",
    "access.lockout": "bold magenta",
    "item.consumed": "yellow",
    "item.restocked": "green",
    "item.removed": "yellow",
    "technician.opened": "blue",
    "technician.closed": "blue",
    "inventory.rebaselined": "blue",
}
_HIDDEN = frozenset(
    {"type", "seq", "time", "event_id", "site_id", "cabinet_id", "schema_version", "session_id"}
)


class Screen:
    """The demo's console output; ``event`` is called on the loop for each opened event."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.counts: dict[str, int] = {}
        # The installer's first cycle returns every tool at once: counted, not listed.
        self.quiet = False
        self.quiet_upto = 0
        self.quiet_counts: dict[str, int] = {}

    def say(self, text: str | Text, style: str | None = None) -> None:
        self.console.print(text, style=style)

    def intro(
        self,
        scenario: Scenario,
        art: AgentArtefacts,
        *,
        work: Path,
        llrp_port: int,
        badge_url: str,
        broker_port: int | None,
        broker_note: str,
        seconds: float,
        rounds: int,
    ) -> None:
        say = self.console.print
        say("[bold]cabinet-agent demo[/]: a simulated tool cabinet, the agent, a backend")
        say(f"  work dir   {work}  (removed at exit unless --keep)")
        say(
            f"  backend    keys in {work / 'backend'}; the cabinet was given only "
            + ", ".join(CABINET_FILES)
        )
        drawers = ", ".join(f"{d} {a}" for d, a in scenario.drawers.items())
        say(
            f"  reader     LLRP simulator on 127.0.0.1:{llrp_port}, {scenario.cabinet.antennas} "
            f"antennas, {len(scenario.items)} tagged tools; drawers: {drawers}"
        )
        say(f"  badges     EM4100 badge reader simulator on {badge_url}; door on GPI 1 / GPO 1")
        if broker_port is not None:
            say(f"  broker     mosquitto on 127.0.0.1:{broker_port}")
        else:
            say(f"  broker     {broker_note}", style="yellow")
        say(f"  agent log  {work / 'agent.log'}")
        people = [p.name for p in scenario.people if p.name in ("alice", "bob")]
        by_name = {name: pseudo for pseudo, name in art.names.items()}
        legend = ", ".join(f"{n} = {_short_actor(by_name[n])}" for n in people if n in by_name)
        say(f"  people     {legend}  (the backend sees only pseudonyms)")
        limits = []
        if seconds:
            limits.append(f"after {seconds:g} s")
        if rounds:
            limits.append(f"after {rounds} round(s)")
        say(f"Stops {' or '.join(limits)}, or on Ctrl-C." if limits else "Ctrl-C to stop.")
        say(
            Text(
                f"{'time':8}  {'seq':>5}  {'event':<20}  {'actor':<16}  what",
                style="bold underline",
            )
        )

    def step(self, step: Step) -> None:
        self.console.print(f"          · {_story_line(step.op, step.args)}", style="dim")

    def hold(self) -> None:
        """Count the events without listing them (the installer's commissioning cycle)."""
        self.quiet = True

    def release(self, upto: int) -> None:
        """List events again (not those up to seq ``upto``, still arriving); say what was held."""
        self.quiet, self.quiet_upto = False, upto
        found = self.quiet_counts.get("item.returned", 0)
        self.console.print(
            f"          the first scan found {found} tagged tools "
            f"({sum(self.quiet_counts.values())} events, not listed)",
            style="dim",
        )

    def event(self, event: Mapping[str, Any], items: Mapping[str, str]) -> None:
        """One line per decrypted event."""
        kind = str(event.get("type", "?"))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.quiet or int(event.get("seq", 0)) <= self.quiet_upto:
            self.quiet_counts[kind] = self.quiet_counts.get(kind, 0) + 1
            return
        line = Text()
        line.append(f"{_clock(event.get('time'))}  ")
        line.append(f"{event.get('seq', '?')!s:>5}  ")
        line.append(f"{kind:<20}", style=_STYLE.get(kind, "bold red"))
        line.append(f"  {_actor_of(event):<16}  ")
        line.append(_what(event, items))
        self.console.print(line)

    def summary(self) -> None:
        total = sum(self.counts.values())
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        self.console.print(f"{total} events opened by the backend ({counts or 'none'})")


def _story_line(op: str, args: tuple[str, ...]) -> str:
    """A scenario step as a sentence."""
    names = ", ".join(args)
    if op == "badge":
        return f"{args[0]} shows a badge"
    if op == "take":
        return f"takes {names}"
    if op == "return":
        if len(args) >= 2 and args[-2] == "to":
            return f"puts back {', '.join(args[:-2])} in {args[-1]}"
        return f"puts back {names}"
    fixed = {
        "wait_unlock": "the lock releases",
        "wait_locked": "the lock engages",
        "open": "opens the door",
        "close": "closes the door",
        "settle": "the agent scans the drawers",
        "door_test": "a technician runs: cabinetctl door test",
    }
    reason = " ".join(args[1:] if op == "technician" else args)
    if op == "technician":
        what = "close" if args[0] == "close" else f"open --reason {reason!r}"
        return f"a technician runs: cabinetctl technician {what}"
    if op == "wait_event" and args[:1] == ("technician.closed",):
        return "the agent scans the drawers"
    if op == "rebaseline":
        return f"a technician runs: cabinetctl inventory rebaseline --reason {reason!r}"
    return fixed.get(op, " ".join((op, *args)))


def _short_actor(pseudonym: str) -> str:
    """``p1.s1.ABCDEFGHIJ…`` → ``p1.s1.ABCDEFGH…``: enough to tell people apart on screen."""
    head, _, tail = pseudonym.rpartition(".")
    if not head or len(tail) <= 8:
        return pseudonym
    return f"{head}.{tail[:8]}…"


def _actor_of(event: Mapping[str, Any]) -> str:
    actors = event.get("actors")
    if isinstance(actors, list) and actors:
        return ",".join(_short_actor(str(a)) for a in actors)
    actor = event.get("actor") or event.get("technician")
    return _short_actor(str(actor)) if isinstance(actor, str) else "-"


def _what(event: Mapping[str, Any], items: Mapping[str, str]) -> str:
    kind = event.get("type")
    epc = event.get("epc")
    if isinstance(epc, str):
        name = items.get(epc, f"unknown tag {epc}")
        asset = event.get("asset_id")
        text = f"{name} ({asset})" if asset and asset != name else name
        if event.get("drawer"):
            text += f"  drawer {event['drawer']}"
        if event.get("home_drawer"):
            text += f" (home {event['home_drawer']})"
        return text
    if kind == "session.closed":
        return (
            f"checked out {event.get('checked_out', 0)}, returned {event.get('returned', 0)}, "
            + (f"consumed {event['consumed']}, " if event.get("consumed") else "")
            + (f"restocked {event['restocked']}, " if event.get("restocked") else "")
            + f"scan {event.get('quality', '?')}"
        )
    if kind == "session.opened":
        return f"door unlocked ({event.get('trigger', '?')})"
    if kind == "technician.opened":
        return f"door unlocked for maintenance: {event.get('reason', '')}"
    if kind == "technician.closed":
        return (
            f"restocked {event.get('restocked', 0)}, removed {event.get('removed', 0)}, "
            f"scan {event.get('quality', '?')}"
        )
    rest = {k: v for k, v in event.items() if k not in _HIDDEN and k not in ("actor", "actors")}
    return json.dumps(rest, default=str, separators=(", ", "=")) if rest else ""


def _clock(value: object) -> str:
    try:
        return datetime.fromisoformat(str(value)).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return "--:--:--"
