"""The real ``cabinet-agent`` entry point, which writes down what the process imported.

``python -m tests.imports_probe run --config CFG`` is ``cabinet-agent run``; when it returns
(after SIGTERM, once the daemon has run), the names in ``sys.modules`` and whether pydantic
scanned for plugins go as JSON to ``$CABINET_TEST_MODULES``. Never shipped.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    from agent.cli.cabinet_agent import main as agent_main

    rc = agent_main(sys.argv[1:])
    loader = sys.modules.get("pydantic.plugin._loader")
    record = {
        "modules": sorted(sys.modules),
        "plugins_scanned": loader is not None and getattr(loader, "_plugins", None) is not None,
        "rc": rc,
    }
    with open(os.environ["CABINET_TEST_MODULES"], "w") as f:
        json.dump(record, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
