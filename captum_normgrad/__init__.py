"""captum-normgrad: NormGrad and its relatives as first-class Captum attribution methods."""

from ._maps import fuse_maps, normalize_maps
from .normgrad import LayerNormGrad
from .normgrad_order1 import LayerNormGradOrder1, per_sample_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "LayerNormGrad",
    "LayerNormGradOrder1",
    "per_sample_cross_entropy",
    "fuse_maps",
    "normalize_maps",
    "__version__",
]
