"""Parameter-space saliency (Levin et al., 2022) and its extreme-value reformulation (Wang & Sato).

- :class:`ParameterSaliency`: per-sample filter (or weight) saliency profiles, reference statistics
  (Welford, mergeable across processes), standardised / naive / normalised saliency, ranking, and
  the map from a profile index back to ``(layer, channel)``.
- :class:`InputSpaceSaliency`: the input-space counterpart, a Captum attribution.
- :class:`POTScorer`: peaks-over-threshold tail probabilities of filter saliency.
- :mod:`~captum_normgrad.parameter_saliency.experiments`: turn-off and fine-tune validation
  experiments, nearest neighbours in saliency space, layer-depth bias report.
"""

from .experiments import (
    Table,
    cosine_distance,
    fine_tune_experiment,
    layer_depth_bias,
    nearest_neighbors,
    stage_labels,
    turn_off_experiment,
)
from .input_space import InputSpaceSaliency, boosted_target
from .pot import POTScorer
from .profiles import FilterRef, ParameterSaliency, WelfordState, merge_welford

__all__ = [
    "ParameterSaliency",
    "WelfordState",
    "merge_welford",
    "FilterRef",
    "InputSpaceSaliency",
    "boosted_target",
    "POTScorer",
    "Table",
    "cosine_distance",
    "nearest_neighbors",
    "turn_off_experiment",
    "fine_tune_experiment",
    "layer_depth_bias",
    "stage_labels",
]
