"""Dataset-scale, resumable attribution runs on ``torch.distributed`` (one process or ``torchrun``).

Library use::

    from captum_normgrad.runner import load_config, run, RunOutput

    report = run(load_config("run.toml"))   # or run("run.toml"); same call under torchrun
    print(report)
    idx, maps = RunOutput(report.output).maps("normgrad/layer2")

Command line: ``captum-normgrad run run.toml`` or
``torchrun --nproc_per_node=2 -m captum_normgrad.cli run run.toml``.
"""

import importlib
from typing import Any, Dict

_EXPORTS: Dict[str, str] = {
    **dict.fromkeys(
        ["RunConfig", "DatasetSpec", "ModelSpec", "MethodSpec", "StatisticsSpec", "load_config", "config_hash"], ".config"
    ),
    **dict.fromkeys(["BUILTIN_METHODS", "ImageFolderDataset"], ".resolve"),
    **dict.fromkeys(
        ["OutputDirError", "RunFailedError", "RunReport", "run", "shard_ranges", "shards_of_rank", "watch_launcher"],
        ".engine",
    ),
    **dict.fromkeys(["RunOutput", "ShardWriteError", "OutputLock", "OutputLockedError"], ".storage"),
    **dict.fromkeys(["WelfordState", "all_reduce_welford", "merge_states"], ".welford"),
}


def __getattr__(name: str) -> Any:
    """Import lazily (PEP 562): ``captum-normgrad --help`` must not pay for torch."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "RunConfig",
    "DatasetSpec",
    "ModelSpec",
    "MethodSpec",
    "StatisticsSpec",
    "load_config",
    "config_hash",
    "run",
    "RunReport",
    "RunOutput",
    "OutputDirError",
    "OutputLock",
    "OutputLockedError",
    "RunFailedError",
    "ShardWriteError",
    "watch_launcher",
    "WelfordState",
    "merge_states",
    "all_reduce_welford",
    "BUILTIN_METHODS",
    "ImageFolderDataset",
    "shard_ranges",
    "shards_of_rank",
]
