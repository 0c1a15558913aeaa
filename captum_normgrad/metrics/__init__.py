"""Metrics for any Captum attribution: adapters to Captum's metrics, localisation and faithfulness."""

from .adapters import (
    InputAttribution,
    LayerNoiseTunnel,
    as_input_attribution,
    module_by_name,
    reduce_map_channels,
    upsample_to_input,
)
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

__all__ = [
    "FaithfulnessCurve",
    "InputAttribution",
    "LayerNoiseTunnel",
    "PointingGameResult",
    "as_input_attribution",
    "blur_baseline",
    "boxes_to_masks",
    "deletion_curve",
    "energy_pointing_game",
    "insertion_curve",
    "module_by_name",
    "pointing_accuracy",
    "pointing_game",
    "pointing_game_hits",
    "pointing_points",
    "reduce_map_channels",
    "upsample_to_input",
]
