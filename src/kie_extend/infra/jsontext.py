"""JSON text as producers may send it: every object's keys unique.

``json.loads`` keeps the last of two equal keys without a word, so a body or a batch line that says
``"title"`` twice would be sent with whichever came last; CSV files already refuse a repeated
column. :func:`loads_unique` refuses such text instead.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice; ``key`` is that key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"the key {json.dumps(key)} appears twice in one object")


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: the object, or DuplicateKeyError."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def loads_unique(text: str | bytes) -> Any:
    """``json.loads(text)`` refusing an object with a repeated key: DuplicateKeyError (a ValueError);
    JSONDecodeError for text that is not JSON."""
    return json.loads(text, object_pairs_hook=unique_object)
