"""Deprecated location: ``captum_normgrad.metrics`` moved to ``captum_normgrad.evaluation and captum_normgrad.wrappers`` (this alias goes in the next release)."""

from .._deprecated import alias_module

alias_module(
    __name__,
    "captum_normgrad.evaluation and captum_normgrad.wrappers",
    ["captum_normgrad.evaluation", "captum_normgrad.wrappers", "captum_normgrad._maps", "captum_normgrad._layers"],
    [
        "InputAttribution",
        "LayerNoiseTunnel",
        "as_input_attribution",
        "upsample_to_input",
        "module_by_name",
        "reduce_map_channels",
        "resize_maps",
    ],
)
