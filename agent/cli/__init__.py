"""Command-line entry points: cabinet-agent (daemon) and cabinetctl (technician tool)."""
