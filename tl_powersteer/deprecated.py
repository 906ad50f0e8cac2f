"""Former names that keep working for one release, each with a ``DeprecationWarning``.

Most live beside their new homes (a module ``__getattr__``, ``renamed_options`` for
keyword arguments, ``renamed_attribute`` for result fields). ``SensitivityAtlas.to_html``
cannot: it writes the atlas page, whose module (``plotting``) sits above the result, so it
is attached here, at the top of the package (``tl_powersteer`` imports this module).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .adapters import Model, ModelAdapter
from .atlas import SensitivityAtlas, token_effects
from .plotting import atlas_html

__all__: list[str] = []


def _to_html(
    self: SensitivityAtlas,
    path: str | os.PathLike[str],
    *,
    model: Model | ModelAdapter | None = None,
    kl: float = 1.0,
    top: int = 5,
    progress: bool = True,
) -> Path:
    """Deprecated: ``atlas_html(atlas, path, effects=token_effects(model, atlas))``."""
    warnings.warn(
        "SensitivityAtlas.to_html is deprecated and goes in the next release: use "
        "tl_powersteer.atlas_html(atlas, path, effects=tl_powersteer.token_effects(model, "
        "atlas)), which keeps the page's computation (the effects) apart from writing it",
        DeprecationWarning,
        stacklevel=2,
    )
    effects = None
    if model is not None:
        effects = token_effects(model, self, kl=kl, top=top, progress=progress)
    return atlas_html(self, path, effects=effects)


setattr(SensitivityAtlas, "to_html", _to_html)  # noqa: B010
