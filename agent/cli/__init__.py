"""Command-line entry points: cabinet-agent (daemon) and cabinetctl (technician tool).

Importing this package (every entry point does, before any pydantic model exists) turns off
pydantic's plugin discovery unless the environment says otherwise: it would read the metadata
of every distribution installed beside the agent at start-up (importlib.metadata) and load
whatever declares a ``pydantic`` entry point into the daemon's validation of hostile input. The
agent uses no plugin (docs/decisions.md, "Small boards").
"""

import os

os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
