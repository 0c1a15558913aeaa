"""Deprecated location: ``captum_normgrad.quantus_bridge`` moved to ``captum_normgrad.evaluation.quantus_bridge`` (this alias goes in the next release)."""

from ._deprecated import alias_module

alias_module(__name__, "captum_normgrad.evaluation.quantus_bridge", ["captum_normgrad.evaluation.quantus_bridge"])
