"""Checks for user input where it enters: one message shape, naming the argument, the value and what
would be valid."""

from __future__ import annotations

import json
from pathlib import Path


def is_int(value) -> bool:
    """A true integer (bool excluded: True is not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value, minimum: int = 1, what: str = "") -> int:
    """value if it is an int >= minimum, else ValueError("name must be an int >= minimum (what), got value")."""
    if not is_int(value) or value < minimum:
        detail = f" ({what})" if what else ""
        raise ValueError(f"{name} must be an int >= {minimum}{detail}, got {value!r}")
    return value


def read_json(file: str | Path):
    """The JSON value in a file; ValueError naming the file when it is not JSON (or not text)."""
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
