"""The methods Power Steering is compared with, returning the same ``SteeringVector``.

* ``caa_vector``: contrastive activation addition, the mean activation difference of
  paired positive and negative prompts (and ``caa_layer_sweep`` over layers);
* ``probe``: cosine similarity of activations with a vector, per prompt;
* ``melbo``: MELBO, unsupervised steering vectors optimised to maximise the change of
  a later activation (Mack & Turner 2024).
"""

from .caa import caa_layer_sweep, caa_vector
from .melbo import MelboResult, melbo, melbo_optimise
from .probe import probe

__all__ = ["MelboResult", "caa_layer_sweep", "caa_vector", "melbo", "melbo_optimise", "probe"]
