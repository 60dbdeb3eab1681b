"""The words status, selftest and metrics use for the broker link (no paho import here)."""

from __future__ import annotations

import enum


class BrokerState(enum.StrEnum):
    """The broker connection as status, selftest and metrics report it."""

    CONNECTING = "connecting"  # no attempt has failed yet
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"  # connect attempts fail (no TCP, TLS or CONNACK)
    NOT_ACKNOWLEDGING = "not_acknowledging"  # CONNACK, but publishes get no PUBACK
    TAKEN_OVER = "taken_over"  # another client with our client id takes the session over


class CommandsState(enum.StrEnum):
    """Our subscription to the cmd topics (allow-list, asset registry)."""

    NOT_YET = "not_yet"  # never connected
    SUBSCRIBING = "subscribing"  # SUBSCRIBE sent, no SUBACK yet
    SUBSCRIBED = "subscribed"
    REFUSED = "refused"  # the broker's SUBACK refused at least one cmd topic
