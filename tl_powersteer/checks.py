"""Checks of user input: type predicates (``bool`` is an ``int`` to Python, not to us) and
former option names.

>>> from tl_powersteer.checks import is_int, is_number
>>> is_int(3), is_int(True), is_int(3.0), is_number(0.5), is_number(False)
(True, False, False, True, False)
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["is_int", "is_number", "renamed_attribute", "renamed_options"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def renamed_options(
    function: str, given: dict[str, Any], renames: dict[str, str]
) -> dict[str, Any]:
    """``given`` (a function's ``**kwargs``) under the options' current names.

    Each former name in ``renames`` still works for one release, with a
    ``DeprecationWarning`` naming the new one; any other name is refused with the
    ``TypeError`` Python gives an unknown keyword.
    """
    out: dict[str, Any] = {}
    for name, value in given.items():
        if name not in renames:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
        warnings.warn(
            f"{function}(): {name}= is now {renames[name]}= (the old name goes in the next "
            "release)",
            DeprecationWarning,
            stacklevel=3,
        )
        out[renames[name]] = value
    return out


def renamed_attribute(old: str, new: str) -> property:
    """A read-only ``old`` attribute that returns ``new``, with a ``DeprecationWarning``:
    a renamed result field keeps its former name for one release."""

    def get(self: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is now {new} (the old name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of ``{new}``.")
