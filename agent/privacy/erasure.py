"""The body of a signed erasure document: the pseudonyms whose traces the cabinet erases.

docs/privacy.md §7. Checked like every inbound body, even validly signed: a bounded list of
distinct, well-formed pseudonyms, nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.privacy.pseudonym import is_pseudonym

MAX_ERASURE_PSEUDONYMS: Final = 1000


class ErasureError(ValueError):
    """The erasure body is malformed."""


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    pseudonyms: frozenset[str]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ErasureRequest:
        if set(body) != {"pseudonyms"}:
            raise ErasureError("an erasure body has exactly one field, 'pseudonyms'")
        items = body["pseudonyms"]
        if isinstance(items, str | bytes) or not isinstance(items, list | tuple):
            raise ErasureError("'pseudonyms' must be a list")
        if not 1 <= len(items) <= MAX_ERASURE_PSEUDONYMS:
            raise ErasureError(f"'pseudonyms' holds 1..{MAX_ERASURE_PSEUDONYMS} entries")
        for i, p in enumerate(items):
            # The value is left out of the message: it is what is being erased.
            if not isinstance(p, str) or not is_pseudonym(p):
                raise ErasureError(f"'pseudonyms'[{i}] is not a badge pseudonym")
        found = frozenset(items)
        if len(found) != len(items):
            raise ErasureError("'pseudonyms' names someone twice")
        return cls(found)
