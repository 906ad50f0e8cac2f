"""Deprecated alias of ``tl_powersteer.linalg``, kept for one release."""

import warnings

from .linalg import (
    LinearOperator,
    MatrixOperator,
    PowerIterationResult,
    block_power_iteration,
    canonical_signs,
    check_iteration_args,
)

__all__ = [
    "LinearOperator",
    "MatrixOperator",
    "PowerIterationResult",
    "block_power_iteration",
    "canonical_signs",
    "check_iteration_args",
]

warnings.warn(
    "tl_powersteer.power is deprecated and will be removed in the next release: "
    "import from tl_powersteer.linalg instead",
    DeprecationWarning,
    stacklevel=2,
)
