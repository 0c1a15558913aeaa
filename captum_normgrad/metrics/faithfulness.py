"""Deprecated location: ``captum_normgrad.metrics.faithfulness`` moved to ``captum_normgrad.evaluation.faithfulness`` (this alias goes in the next release)."""

from .._deprecated import alias_module

alias_module(__name__, "captum_normgrad.evaluation.faithfulness", ["captum_normgrad.evaluation.faithfulness"])
