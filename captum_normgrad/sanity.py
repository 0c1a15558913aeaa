"""Deprecated location: ``captum_normgrad.sanity`` moved to ``captum_normgrad.evaluation.sanity`` (this alias goes in the next release)."""

from ._deprecated import alias_module

alias_module(__name__, "captum_normgrad.evaluation.sanity", ["captum_normgrad.evaluation.sanity"])
