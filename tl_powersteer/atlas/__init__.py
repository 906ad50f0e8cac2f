"""The sensitivity atlas: the top Power Steering spectra of every (source, target) layer pair.

Modules, in the order data flows through them:

* ``plan``: the arguments, checked and resolved before any forward pass;
* ``methods`` and ``sketch``: the exact, power and sketch methods;
* ``checkpoint``: the file an interrupted run resumes from, with the sketch's working state;
* ``run``: ``sensitivity_atlas``, which drives them;
* ``result``: ``SensitivityAtlas``, what it returns;
* ``merge``: ``merge_atlases``, one atlas from shards computed as separate jobs;
* ``effects``: the next-token effects the atlas page lists (``token_effects``).
"""

from .effects import token_effects
from .merge import merge_atlases
from .plan import ATLAS_METHODS
from .result import SensitivityAtlas
from .run import sensitivity_atlas, validate_atlas_arguments

__all__ = [
    "ATLAS_METHODS",
    "SensitivityAtlas",
    "merge_atlases",
    "sensitivity_atlas",
    "token_effects",
    "validate_atlas_arguments",
]
