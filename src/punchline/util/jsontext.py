"""JSON from someone else: every way it can go wrong becomes one ValueError.

`json.loads` raises RecursionError on deeply nested input ("[[[[…") and UnicodeDecodeError on
bad bytes; a peer must not be able to crash a node with either. Every parser of network JSON
goes through here.
"""

from __future__ import annotations

import json
from typing import Any


def loads_object_untrusted(data: bytes | str) -> dict[str, Any]:
    """A JSON object (the shape every punchline message has), else ValueError."""
    value = loads_untrusted(data)
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def loads_untrusted(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON: {type(exc).__name__}") from exc
