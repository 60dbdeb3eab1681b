"""MQTT delivery: sealed outbox rows to the broker, signed commands back (docs/delivery.md)."""
