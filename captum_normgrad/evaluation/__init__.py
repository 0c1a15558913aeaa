"""Evaluation tools for any Captum attribution (ours or Captum's): similarity measures,
localisation (pointing game, energy), faithfulness (deletion / insertion), sanity checks (model
parameter randomization, class sensitivity) and, in :mod:`captum_normgrad.evaluation.quantus_bridge`
(imported on demand: it needs the ``quantus`` extra), a bridge to Quantus.
"""

from .faithfulness import FaithfulnessCurve, blur_baseline, deletion_curve, insertion_curve
from .localisation import (
    PointingGameResult,
    boxes_to_masks,
    energy_pointing_game,
    pointing_accuracy,
    pointing_game,
    pointing_game_hits,
    pointing_points,
)
from .sanity import (
    ClassSensitivityResult,
    RandomizationResult,
    class_sensitivity,
    default_randomization_modules,
    model_parameter_randomization,
)
from .similarity import MEASURES, map_similarity, normalize_abs, spearman_rho

__all__ = [
    "MEASURES",
    "ClassSensitivityResult",
    "FaithfulnessCurve",
    "PointingGameResult",
    "RandomizationResult",
    "blur_baseline",
    "boxes_to_masks",
    "class_sensitivity",
    "default_randomization_modules",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_curve",
    "map_similarity",
    "model_parameter_randomization",
    "normalize_abs",
    "pointing_accuracy",
    "pointing_game",
    "pointing_game_hits",
    "pointing_points",
    "spearman_rho",
]
