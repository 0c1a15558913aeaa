"""Deprecated location: ``captum_normgrad.metrics.localisation`` moved to ``captum_normgrad.evaluation.localisation`` (this alias goes in the next release)."""

from .._deprecated import alias_module

alias_module(__name__, "captum_normgrad.evaluation.localisation", ["captum_normgrad.evaluation.localisation"])
