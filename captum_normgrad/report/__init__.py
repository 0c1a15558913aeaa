r"""Browse and publish the maps of a run (``captum-normgrad explain`` or ``captum-normgrad run``).

* :func:`build_report` writes a self-contained HTML report (``captum-normgrad report RUN_FOLDER``):
  image x method x layer, sortable by pointing hit and energy on the mask, with filters, per-class
  rates and a side-by-side comparison of two methods, for explain and runner output folders;
* :func:`write_grids` writes one publication grid per image (``captum-normgrad explain --grid``);
* :func:`load_explain_run` and :func:`score_run` read an explain folder and score its maps against
  masks; :func:`read_runner_run` reads a runner folder (images from the run's dataset).

Examples::

    >>> from captum_normgrad.report import build_report
    >>> build_report("maps", masks="masks")       # maps/report/index.html
"""

from .html import build_report
from .run import (
    ExplainRun,
    describe_preprocess,
    find_masks,
    load_explain_run,
    mask_to_model_input,
    record_preprocessing,
    score_map,
    score_run,
    write_grids,
)
from .runner_run import RunnerSamples, read_runner_run

__all__ = [
    "build_report",
    "ExplainRun",
    "describe_preprocess",
    "find_masks",
    "load_explain_run",
    "mask_to_model_input",
    "read_runner_run",
    "record_preprocessing",
    "RunnerSamples",
    "score_map",
    "score_run",
    "write_grids",
]
