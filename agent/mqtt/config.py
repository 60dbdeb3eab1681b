"""The ``[mqtt]`` config section: broker, TLS, in-flight window, replay throttle."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.privacy.keyfile import check_trusted_file
from drivers.config import BackoffConfig, StrictModel

DEFAULT_MAX_COMMAND_BYTES = 1024 * 1024  # also the signing tool's default limit
_PIN_RE = re.compile(r"^[0-9a-f]{64}$")
_TOPIC_PART_RE = r"^[a-z0-9][a-z0-9_.-]{0,31}(/[a-z0-9][a-z0-9_.-]{0,31}){0,3}$"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the only places plaintext may go)."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class TlsConfig(StrictModel):
    ca_file: Path = Field(description="private CA that signed the broker certificate (PEM)")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mTLS")
    key_file: Path | None = Field(None, description="client private key (PEM) for mTLS")
    server_name: str | None = Field(
        None, min_length=1, description="name to check in the broker certificate (default: host)"
    )
    min_version: Literal["1.2", "1.3"] = Field("1.3", description="lowest TLS version accepted")
    spki_pins: list[str] = Field(
        default=[],
        description="accepted SHA-256 digests (hex) of the broker's SubjectPublicKeyInfo; "
        "empty = no pin. Several allow a key rotation.",
    )

    @field_validator("spki_pins")
    @classmethod
    def _pins_hex(cls, pins: list[str]) -> list[str]:
        out = [p.strip().lower().replace(":", "") for p in pins]
        bad = [p for p in out if not _PIN_RE.fullmatch(p)]
        if bad:
            raise ValueError("each pin is 64 hex digits (SHA-256 of the DER SubjectPublicKeyInfo)")
        return out

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for mTLS)")
        return self


class MqttConfig(StrictModel):
    host: str = Field(min_length=1, description="broker host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="default 8883 with TLS, else 1883")
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT version; on 3.1.1 (no PUBACK reason codes) an event counts as taken "
        "once the broker has acknowledged it and delivered it back on its own topic",
    )
    tls: TlsConfig | None = None
    allow_plaintext: bool = Field(
        False, description="permit an unencrypted connection to a non-loopback broker"
    )
    topic_prefix: str = Field("cabinets/v1", pattern=_TOPIC_PART_RE)
    keepalive_s: int = Field(30, ge=5, le=3600)
    connect_timeout_s: float = Field(10.0, gt=0, le=120, description="TCP + TLS + CONNACK")
    persistent_session: bool = Field(
        True, description="keep the broker session (command subscriptions) across reconnects"
    )
    session_expiry_s: int = Field(86400, ge=0, le=0xFFFFFFFF, description="MQTT v5 only")
    inflight_window: int = Field(
        20, ge=1, le=1000, description="unacknowledged publishes at most (capped by broker)"
    )
    replay_rate: float = Field(
        50.0, ge=0, le=1_000_000, description="backlog messages per second (0 = unthrottled)"
    )
    replay_burst: int = Field(20, ge=1, le=100_000, description="token bucket depth")
    # New rows are sent the moment they are committed (Publisher.notify), a refused row as soon
    # as its failure is recorded; this is only the safety net for what nothing announces.
    poll_interval_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="caught up, read the whole outbox again this often (safety net)",
    )
    backoff: BackoffConfig = BackoffConfig()
    failure_backoff: BackoffConfig = Field(
        BackoffConfig(initial_s=1.0, max_s=60.0),
        description="pause after a refused publish (PUBACK reason >= 0x80)",
    )
    max_command_bytes: int = Field(
        DEFAULT_MAX_COMMAND_BYTES,
        ge=1024,
        le=64 * 1024 * 1024,
        description="larger cmd messages are rejected",
    )

    @model_validator(mode="after")
    def _no_plaintext_off_box(self) -> MqttConfig:
        if self.tls is None and not self.allow_plaintext and not is_loopback_host(self.host):
            raise ValueError(
                f"plaintext MQTT to non-loopback broker {self.host!r} refused: "
                "configure [mqtt.tls] or set allow_plaintext = true"
            )
        return self

    @model_validator(mode="after")
    def _no_session_expiry_on_311(self) -> MqttConfig:
        if self.protocol == "3.1.1" and "session_expiry_s" in self.model_fields_set:
            raise ValueError(
                "session_expiry_s is MQTT 5 only: on 3.1.1 the broker decides how long it keeps "
                "a persistent session (mosquitto persistent_client_expiration, RabbitMQ "
                'mqtt.subscription_ttl); remove it or use protocol = "5"'
            )
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls is not None else 1883


def check_tls_files(tls: TlsConfig) -> None:
    """The CA, certificate and key files exist and nobody but root or us can change them (the
    key: nor read it). Raises KeyFileError, a PermanentError naming the file and the fix."""
    check_trusted_file(tls.ca_file)
    if tls.cert_file is not None:
        check_trusted_file(tls.cert_file)
    if tls.key_file is not None:
        check_trusted_file(tls.key_file, secret=True)
