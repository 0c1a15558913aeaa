"""Deprecated location: ``captum_normgrad.metrics.adapters`` moved to ``captum_normgrad.wrappers`` (this alias goes in the next release)."""

from .._deprecated import alias_module

alias_module(
    __name__,
    "captum_normgrad.wrappers",
    ["captum_normgrad.wrappers", "captum_normgrad._maps", "captum_normgrad._layers"],
    ["module_by_name", "reduce_map_channels", "resize_maps"],
)
