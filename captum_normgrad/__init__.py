"""captum-normgrad: NormGrad and its relatives as first-class Captum attribution methods."""

from ._maps import fuse_maps, normalize_maps
from .normgrad import LayerNormGrad

__version__ = "0.1.0"

__all__ = [
    "LayerNormGrad",
    "fuse_maps",
    "normalize_maps",
    "__version__",
]
