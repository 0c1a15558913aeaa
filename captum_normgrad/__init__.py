"""captum-normgrad: NormGrad and its relatives as first-class Captum attribution methods."""

from ._maps import fuse_maps, normalize_maps
from .normgrad import LayerNormGrad
from .normgrad_order1 import LayerNormGradOrder1, per_sample_cross_entropy
from .metrics import LayerNoiseTunnel, as_input_attribution, deletion_curve, energy_pointing_game, insertion_curve, pointing_game
from .parameter_saliency import InputSpaceSaliency, ParameterSaliency, POTScorer
from .sanity import class_sensitivity, model_parameter_randomization

__version__ = "0.1.0"

__all__ = [
    "LayerNormGrad",
    "LayerNormGradOrder1",
    "per_sample_cross_entropy",
    "fuse_maps",
    "normalize_maps",
    "LayerNoiseTunnel",
    "as_input_attribution",
    "pointing_game",
    "energy_pointing_game",
    "deletion_curve",
    "insertion_curve",
    "model_parameter_randomization",
    "class_sensitivity",
    "ParameterSaliency",
    "InputSpaceSaliency",
    "POTScorer",
    "__version__",
]
