"""Dataset-scale, resumable attribution runs on ``torch.distributed`` (one process or ``torchrun``).

Library use::

    from captum_normgrad.runner import load_config, run, RunOutput

    report = run(load_config("run.toml"))   # or run("run.toml"); same call under torchrun
    print(report)
    idx, maps = RunOutput(report.output).maps("normgrad/layer2")

Command line: ``captum-normgrad run run.toml`` or
``torchrun --nproc_per_node=2 -m captum_normgrad.cli run run.toml``.
"""

from .config import DatasetSpec, MethodSpec, ModelSpec, RunConfig, StatisticsSpec, config_hash, load_config
from .resolve import BUILTIN_METHODS, ImageFolderDataset
from .run import OutputDirError, RunReport, run, shard_ranges, shards_of_rank
from .storage import RunOutput, ShardWriteError
from .welford import WelfordState, all_reduce_welford, merge_states

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
    "ShardWriteError",
    "WelfordState",
    "merge_states",
    "all_reduce_welford",
    "BUILTIN_METHODS",
    "ImageFolderDataset",
    "shard_ranges",
    "shards_of_rank",
]
