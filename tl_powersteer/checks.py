"""Checks of user input: type predicates (``bool`` is an ``int`` to Python, not to us; a
NumPy or torch integer scalar is one), and former option names.

>>> import numpy as np, torch
>>> from tl_powersteer.checks import is_int, is_number
>>> is_int(3), is_int(np.int64(3)), is_int(torch.tensor(3)), is_int(True), is_int(3.0)
(True, True, True, False, False)
>>> is_number(0.5), is_number(False)
(True, False)
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "check_seed",
    "is_int",
    "is_number",
    "plain_ints",
    "renamed_attribute",
    "renamed_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer and not a bool: an int, or a scalar that
    ``operator.index`` takes (NumPy integers, 0-d integer tensors)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, torch.Tensor):
        kind = value.dtype
        return value.ndim == 0 and not (
            kind.is_floating_point or kind.is_complex or kind == torch.bool
        )
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_plain(value: Any) -> Any:
    """``value`` with every integer scalar that is not an ``int`` (NumPy, torch) made one,
    also inside lists, tuples and slices; anything else as it is."""
    if is_int(value) and not isinstance(value, int):
        return operator.index(value)
    if isinstance(value, (list, tuple)) and any(
        is_int(x) and not isinstance(x, int) for x in value
    ):
        return type(value)(as_plain(x) for x in value)
    if isinstance(value, slice):
        return slice(as_plain(value.start), as_plain(value.stop), as_plain(value.step))
    return value


def plain_ints(function: F) -> F:
    """``function`` called with its integer-scalar arguments made ``int`` (``as_plain``),
    so that what it stores and prints is an ``int`` whatever integer type was passed."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return function(*args, **kwargs)  # Python's own message for a bad call
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = {k: as_plain(v) for k, v in value.items()}
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                bound.arguments[name] = tuple(as_plain(v) for v in value)
            else:
                bound.arguments[name] = as_plain(value)
        return function(*bound.args, **bound.kwargs)

    return call  # type: ignore[return-value]


def check_seed(seed: Any) -> None:
    """A random seed is an int (``torch.Generator.manual_seed`` takes nothing else)."""
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")


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
