"""What the demo sets up before its story: a broker (when mosquitto is there), the demo-shift
scenario at the requested size, the backend's keys, and a cabinet given only the files a real one
gets, with its agent config written out."""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simulators.broker import Mosquitto

if TYPE_CHECKING:  # the simulators are imported only when the demo runs
    from backend.keys import BackendKeys
    from simulators.cabinet import AgentArtefacts, Scenario

NO_MOSQUITTO_ENV = "CABINET_DEMO_NO_MOSQUITTO"  # set (non-empty): behave as if not installed
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")  # Debian's path, often not on a user's PATH
# demo-loop plus a consumable and a technician session (demo-loop itself stays as it is: the
# field soak and `cabinet-sim cabinet` without a control socket play it).
SCENARIO = "demo-shift"
DRAWERS = ("top", "middle", "bottom")  # the demo scenario's drawers
MIN_TAGS, MAX_TAGS = 4, 1000
MIN_ANTENNAS, MAX_ANTENNAS = len(DRAWERS), 8
CABINET_FILES = ("backend-hpke.pub", "signing.pub", "site.key")


@dataclass(frozen=True)
class Cabinet:
    """The provisioned cabinet: the backend's keys, what it signed, the agent's config file."""

    keys: BackendKeys
    art: AgentArtefacts
    config_path: Path


def provision_cabinet(
    scenario: Scenario, work: Path, *, llrp_port: int, badge_url: str, mqtt_port: int | None
) -> Cabinet:
    """Backend keys in ``work/backend``; the cabinet in ``work/cabinet`` gets only
    ``CABINET_FILES`` and an agent config for the simulators' ports (and the broker's)."""
    from backend.keys import generate_backend_keys
    from simulators.cabinet import INSTALLER, agent_config, build_artefacts, to_toml

    keys = generate_backend_keys(work / "backend")
    creds = work / "cabinet" / "credentials"
    creds.mkdir(parents=True, mode=0o700)
    for name in CABINET_FILES:
        shutil.copy(work / "backend" / name, creds / name)
    (creds / "site.key").chmod(0o600)
    art = build_artefacts(
        scenario,
        site=keys.site,
        signing_key=keys.signing_private,
        signing_kid=keys.signing_kid,
        extra_people=[INSTALLER],
    )
    cfg_doc = agent_config(
        scenario,
        art,
        llrp_port=llrp_port,
        badge_url=badge_url,
        key_dir=creds,
        state_dir=work / "cabinet",
        mqtt_port=mqtt_port,
    )
    config_path = work / "cabinet" / "agent.toml"
    config_path.write_text(to_toml(cfg_doc), encoding="utf-8")
    return Cabinet(keys, art, config_path)


def demo_scenario(tags: int, antennas: int) -> Scenario:
    """The bundled demo scenario, with ``antennas`` ports and ``tags`` tools in total."""
    from simulators.cabinet import find_scenario, parse_scenario

    path = find_scenario(SCENARIO)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    data["cabinet"] = {**data.get("cabinet", {}), "antennas": antennas}
    data["drawers"] = _spread(antennas)
    items = list(data.get("items", []))
    for n in range(1, tags - len(items) + 1):
        drawer = DRAWERS[n % len(DRAWERS)]
        items.append(
            {
                "name": f"tool-{n:03d}",
                "epc": f"e2801160600002000001{n:04x}",
                "asset_id": f"TL-{n:04d}",
                "drawer": drawer,
                "home_drawer": drawer,
            }
        )
    data["items"] = items
    return parse_scenario(data, str(path))


def _spread(antennas: int) -> dict[str, list[int]]:
    """Antenna ports over the drawers, in order; the first drawers get the spare ones."""
    base, spare = divmod(antennas, len(DRAWERS))
    out: dict[str, list[int]] = {}
    port = 1
    for i, drawer in enumerate(DRAWERS):
        size = base + (1 if i < spare else 0)
        out[drawer] = list(range(port, port + size))
        port += size
    return out


def check_arguments(seconds: float, tags: int, antennas: int, rounds: int) -> str | None:
    """What is wrong with the command line (before anything starts), or None."""
    if not seconds >= 0:  # also refuses NaN
        return "--seconds must be 0 (until Ctrl-C) or more"
    if rounds < 0:
        return "--rounds must be 0 (no limit) or more"
    if not MIN_TAGS <= tags <= MAX_TAGS:
        return f"--tags must be within {MIN_TAGS}..{MAX_TAGS} (the scenario has four tagged items)"
    if not MIN_ANTENNAS <= antennas <= MAX_ANTENNAS:
        return f"--antennas must be within {MIN_ANTENNAS}..{MAX_ANTENNAS} (one or more per drawer)"
    return None


def find_mosquitto(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The mosquitto binary, or None (not installed, or hidden by ``CABINET_DEMO_NO_MOSQUITTO``)."""
    if environ.get(NO_MOSQUITTO_ENV):
        return None
    found = shutil.which("mosquitto", path=environ.get("PATH"))
    if found:
        return Path(found)
    return MOSQUITTO_FALLBACK if os.access(MOSQUITTO_FALLBACK, os.X_OK) else None


def start_broker(directory: Path) -> tuple[Mosquitto | None, str]:
    """A private mosquitto in ``directory``, or None and why (the screen says it)."""
    binary = find_mosquitto()
    if binary is None:
        return None, (
            "mosquitto not installed: showing events straight from the sealed outbox — "
            "apt-get install mosquitto for the full path"
        )
    # Persistence off; as root it runs as root (it would switch to the mosquitto user and lose
    # the work dir); its own process group, so Ctrl-C stops the agent (a clean MQTT disconnect)
    # before the broker.
    broker = Mosquitto(directory, binary=str(binary), persistence=False, detached=True)
    try:
        broker.start()
    except (RuntimeError, OSError):
        broker.stop()
        return None, (
            f"mosquitto did not start (log: {directory / 'mosquitto.log'}): showing events "
            "straight from the sealed outbox"
        )
    return broker, ""
