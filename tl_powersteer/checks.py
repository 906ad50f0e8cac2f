"""Type predicates for checking user input (``bool`` is an ``int`` to Python, not to us).

>>> from tl_powersteer.checks import is_int, is_number
>>> is_int(3), is_int(True), is_int(3.0), is_number(0.5), is_number(False)
(True, False, False, True, False)
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_int", "is_number"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
