"""Bundled cabinet scenarios (TOML package data; format in docs/scenarios.md)."""
