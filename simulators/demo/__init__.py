"""``cabinet-agent demo``: a simulated tool cabinet, the real agent and a reference backend.

Everything runs from embedded defaults in a temporary directory: backend keys are generated and
the cabinet is given only the three files a real one gets (``backend-hpke.pub``, ``signing.pub``,
``site.key``); the bundled ``demo-shift`` scenario plays people badging, taking and returning tools
(and a consumable), and a technician restocking in a technician session (``cabinetctl`` on the
control socket the demo serves for its in-process agent),
on the LLRP reader, badge reader and door simulators; the agent (``CabinetApp``, in this process)
seals every event to the backend's key and publishes it through a local mosquitto; the backend
side opens the envelopes and prints them. Without mosquitto the backend side opens the envelopes
straight from the agent's sealed outbox instead.

The package: ``run`` is the orchestration, ``display`` what the screen shows, ``provision`` what
is set up before the story (broker, scenario, keys, the cabinet's files and config),
``backend_side`` the opening of the sealed events, ``tasks`` the bounded waits they share.
"""

from simulators.demo.provision import NO_MOSQUITTO_ENV, find_mosquitto
from simulators.demo.run import EX_FAILED, EX_OK, EX_USAGE, run_demo

__all__ = ["EX_FAILED", "EX_OK", "EX_USAGE", "NO_MOSQUITTO_ENV", "find_mosquitto", "run_demo"]
