"""People's data: badge pseudonyms, sealed events (HPKE) and signed backend documents.

Spec for the bytes on the wire: ``docs/envelope.md`` and ``docs/privacy.md``.
"""
