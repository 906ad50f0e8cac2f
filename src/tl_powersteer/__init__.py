"""tl_powersteer: Power Steering vectors for TransformerLens models.

Add a vector at a source hook, read a later target activation, and take the top right
singular vectors of the Jacobian between them: the directions the model is most
sensitive to. See :func:`power_steer` and :class:`LayerJacobian`.
"""

from .atlas import SensitivityAtlas, sensitivity_atlas
from .io import load, save
from .jacobian import LayerJacobian
from .models import load_model
from .plotting import plot_atlas
from .power import block_power_iteration
from .power_steering import PowerSteeringResult, power_steer

__version__ = "0.1.0"

__all__ = [
    "LayerJacobian",
    "PowerSteeringResult",
    "SensitivityAtlas",
    "block_power_iteration",
    "load",
    "load_model",
    "plot_atlas",
    "power_steer",
    "save",
    "sensitivity_atlas",
]
