"""The cabinet domain: pure, deterministic, no I/O. Fed driver values and time; returns events and commands."""
