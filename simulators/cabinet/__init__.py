"""Cabinet scenario simulator: people, tagged items, drawers, a door and a badge reader, played
from a TOML scenario file against the LLRP reader simulator, the badge simulator and the simulated
door (format: ``docs/scenarios.md``).

```python
scenario = load_scenario(find_scenario("plain-checkout"))
populate(scenario, llrp)                      # the items' tags, in their drawers
door = wire_door(scenario, llrp)              # sensor on a GPI, lock on a GPO
runner = ScenarioRunner(scenario, llrp, badge, door, events=log)   # log: decrypted events
log.mark()
await runner.run()
problems = match_events(scenario.expect, log.since_mark(), artefacts)   # [] = exact match
```

``build_artefacts`` turns the scenario's people and items into what the agent needs (a signed
allow-list of pseudonyms, a signed asset registry, the ``[domain]`` drawers) and ``agent_config``
writes a matching agent config, so a test or a demo starts the daemon with one file and maps the
decrypted events back to names. Raw badge ids live only in the scenario file and in memory here:
they are never logged, never written to a generated file.

Modules: ``scenario`` (the file's model and loaders), ``runner`` (playing the steps on the
simulators), ``provisioning`` (signed documents, agent config, retained MQTT delivery),
``expectations`` (matching events against the expected list), ``toml_writer``.
"""

from simulators.cabinet.control import Ctl, cabinetctl, cabinetctl_command
from simulators.cabinet.expectations import describe_event, describe_events, match_events
from simulators.cabinet.provisioning import (
    FAST_DOMAIN,
    AgentArtefacts,
    agent_config,
    build_artefacts,
    cmd_topic,
    publish_documents,
    publish_retained,
)
from simulators.cabinet.runner import (
    BADGE_GAP_S,
    DEFAULT_TIMEOUT_S,
    EventFeed,
    EventLog,
    ScenarioRunner,
    populate,
    tag_for,
    wire_door,
)
from simulators.cabinet.scenario import (
    INSTALLER,
    AllowListSpec,
    Expected,
    Item,
    Layout,
    Neighbour,
    Person,
    Scenario,
    ScenarioError,
    Step,
    bundled_scenarios,
    find_scenario,
    load_scenario,
    parse_scenario,
)
from simulators.cabinet.toml_writer import to_toml

__all__ = [
    "BADGE_GAP_S",
    "DEFAULT_TIMEOUT_S",
    "FAST_DOMAIN",
    "INSTALLER",
    "AgentArtefacts",
    "AllowListSpec",
    "Ctl",
    "EventFeed",
    "EventLog",
    "Expected",
    "Item",
    "Layout",
    "Neighbour",
    "Person",
    "Scenario",
    "ScenarioError",
    "ScenarioRunner",
    "Step",
    "agent_config",
    "build_artefacts",
    "bundled_scenarios",
    "cabinetctl",
    "cabinetctl_command",
    "cmd_topic",
    "describe_event",
    "describe_events",
    "find_scenario",
    "load_scenario",
    "match_events",
    "parse_scenario",
    "populate",
    "publish_documents",
    "publish_retained",
    "tag_for",
    "to_toml",
    "wire_door",
]
