"""Checks for user input where it enters: one message shape, naming the argument, the value and what
would be valid."""

from __future__ import annotations


def is_int(value) -> bool:
    """A true integer (bool excluded: True is not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value, minimum: int = 1, what: str = "") -> int:
    """value if it is an int >= minimum, else ValueError("name must be an int >= minimum (what), got value")."""
    if not is_int(value) or value < minimum:
        detail = f" ({what})" if what else ""
        raise ValueError(f"{name} must be an int >= {minimum}{detail}, got {value!r}")
    return value
