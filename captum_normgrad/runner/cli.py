"""The ``run`` subcommand of ``captum-normgrad``: registration and handler, self-contained.

``captum_normgrad/cli.py`` lists :func:`register_run` in its ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional


def _parse_set(items: Optional[List[str]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (VALUE as JSON or a bare string), got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    # errors (bad configuration, another run's output folder, a write error) are raised: the
    # captum-normgrad main() prints them as one line and exits non-zero
    from .config import load_config
    from .engine import run

    overrides = _parse_set(args.set)
    if args.output:
        overrides["output"] = os.path.abspath(args.output)  # relative to the working folder
    if args.no_progress:
        overrides["progress"] = False
    if args.on_change:
        overrides["on_change"] = args.on_change
    if args.fingerprint:
        overrides["fingerprint"] = args.fingerprint
    report = run(load_config(args.config, overrides=overrides))
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 prints the summary of all ranks
        print(json.dumps(report.to_dict(), indent=1) if args.json else report, flush=True)
    return 0


def register_run(sub: Any) -> None:
    """``captum-normgrad run CONFIG``: add the subcommand to an ``argparse`` sub-parsers object."""
    p = sub.add_parser(
        "run",
        help="compute maps for a whole dataset, sharded, resumable (one process or under torchrun)",
        description=(
            "Compute attribution maps (and parameter-saliency statistics) for a whole dataset into sharded "
            "safetensors files with a JSON index. Resumable: rerun the same command to complete a killed run. "
            "Several processes: torchrun --nproc_per_node=N -m captum_normgrad.cli run CONFIG"
        ),
    )
    _add_arguments(p)
    p.set_defaults(func=_cmd_run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run configuration (.toml or .json)")
    p.add_argument("--output", "-o", default=None, help="output directory (overrides the configuration's output)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a top-level key, VALUE as JSON (e.g. --set batch_size=32 --set threads=1); repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--on-change",
        choices=("error", "recompute"),
        default=None,
        help="on resume, when the checkpoint, a factory file or images changed since they were computed: refuse "
        "naming what changed (error, the default) or recompute what depends on them",
    )
    p.add_argument(
        "--fingerprint",
        choices=("stat", "content"),
        default=None,
        help="how image files are fingerprinted: size+mtime (stat, free, the default) or sha256 of the bytes "
        "(content: reads every image once more)",
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m captum_normgrad.runner CONFIG [options]``: the ``run`` subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m captum_normgrad.runner",
        description="Same as `captum-normgrad run`: compute maps for a whole dataset (one process or torchrun).",
    )
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_run(args)
    except (ValueError, TypeError, OSError, LookupError, RuntimeError) as e:
        if os.environ.get("CAPTUM_NORMGRAD_DEBUG"):
            raise
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
