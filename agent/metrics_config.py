"""``[metrics]``: the Prometheus endpoint's settings, apart from ``agent.metrics`` so that a
config without metrics never imports prometheus-client and the HTTP server under it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drivers.config import StrictModel

DEFAULT_PORT = 9780


class MetricsConfig(StrictModel):
    enabled: bool = True
    host: Literal["127.0.0.1", "::1"] = Field(
        "127.0.0.1", description="loopback only: scrape through a local agent or a tunnel"
    )
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="0 picks a free port (tests)")
