"""tl_powersteer: Power Steering vectors for TransformerLens models.

Add a vector at a source hook, read a later target activation, and take the top right
singular vectors of the Jacobian between them: the directions the model is most
sensitive to. See ``power_steer`` and ``LayerJacobian``; map every layer pair
with ``sensitivity_atlas`` and browse it with ``atlas_html``; apply vectors with ``steer`` and measure them with
``effect``, beside the baselines ``caa_vector``, ``probe`` and ``melbo``.
"""

from . import deprecated as _deprecated  # noqa: F401  (former names, kept for one release)
from .atlas import SensitivityAtlas, merge_atlases, sensitivity_atlas, token_effects
from .baselines import MelboResult, caa_layer_sweep, caa_vector, melbo, probe
from .chat import chat_prompt
from .compare import compare_methods, cosine_table, steerability
from .control_vectors import export_control_vector, import_control_vector
from .effect_map import AtlasEffects, atlas_effects
from .effects import effect, rank_vectors
from .forks import fork_families
from .io import load, save
from .jacobian import LayerJacobian
from .linalg import block_power_iteration
from .models import load_model
from .plotting import atlas_frame, atlas_html, plot_atlas, plot_steerability
from .power_steering import PowerSteeringResult, power_steer
from .refine import refine_in_subspace
from .scales import typical_norm
from .steering import generate_steered, steer
from .transfer import TransferResult, transfer
from .vectors import SteeringVector, random_vectors
from .version import __version__ as __version__

__all__ = [
    "AtlasEffects",
    "LayerJacobian",
    "MelboResult",
    "PowerSteeringResult",
    "SensitivityAtlas",
    "SteeringVector",
    "TransferResult",
    "atlas_effects",
    "atlas_frame",
    "atlas_html",
    "block_power_iteration",
    "caa_layer_sweep",
    "caa_vector",
    "chat_prompt",
    "compare_methods",
    "cosine_table",
    "effect",
    "export_control_vector",
    "fork_families",
    "generate_steered",
    "import_control_vector",
    "load",
    "load_model",
    "melbo",
    "merge_atlases",
    "plot_atlas",
    "plot_steerability",
    "power_steer",
    "probe",
    "random_vectors",
    "refine_in_subspace",
    "rank_vectors",
    "save",
    "sensitivity_atlas",
    "steer",
    "steerability",
    "token_effects",
    "transfer",
    "typical_norm",
]
