"""The runner: shard a dataset over ranks, compute maps (and statistics), write resumable shards.

Works unchanged in one process or under ``torchrun --nproc_per_node=N`` (``gloo`` on CPU, ``nccl``
on GPU). Shards are fixed blocks of ``shard_size`` consecutive dataset indices; shard ``k`` belongs
to rank ``k % world_size`` (a disjoint, DistributedSampler-style split without padding), and each
shard is cut into the same batches whatever the number of processes, so the output does not
depend on the world size and a run can be resumed with a different one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import RunConfig, config_hash, diff_configs, load_config
from .resolve import (
    ImageFolderDataset,
    SafeDataset,
    SampleView,
    build_methods,
    collate_views,
    dataset_length,
    model_fingerprint,
    resolve_dataset,
    resolve_model,
)
from .storage import (
    LOCK_FILE,
    SHARD_DIR,
    OutputLock,
    atomic_write_bytes,
    file_fingerprint,
    fingerprint_changed,
    atomic_write_json,
    remove_stale_temporaries,
    shard_is_complete,
    shard_paths,
    write_shard,
)
from .welford import WelfordState, merge_states

__all__ = [
    "run",
    "RunReport",
    "OutputDirError",
    "RunFailedError",
    "shard_ranges",
    "shards_of_rank",
    "preprocessing",
    "CoverResize",
    "watch_launcher",
]

FORMAT = "captum-normgrad-runner/1"
STATISTICS_FILE = "parameter_saliency.pt"
_MAP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OutputDirError(ValueError):
    """The output directory cannot be used for this configuration (another run's, or foreign files)."""


class RunFailedError(RuntimeError):
    """No sample could be computed: a configuration or data error, not a successful run."""


# ---------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------
def shard_ranges(num_samples: int, shard_size: int) -> List[range]:
    """Dataset indices of every shard: consecutive blocks of ``shard_size`` (the last may be shorter)."""
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shards owned by ``rank``: ``k % world_size == rank`` (disjoint, covering every shard)."""
    return list(range(rank, num_shards, world_size))


# ---------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------
EXIT_LAUNCHER_DIED = 75
_WATCHING: Dict[str, Any] = {}


def watch_launcher(poll_s: float = 0.5) -> bool:
    """Exit this process when its parent (the torchrun launcher) dies.

    torchrun starts each worker in its own session, so killing the launcher (``SIGKILL``, a lost
    terminal, a job scheduler's kill of the launcher alone) leaves the workers running
    unsupervised: one may finish the job as a second writer next to a rerun, another may wait for
    its peers until the collective timeout. A daemon thread notices the parent's death (the worker
    is re-parented: ``os.getppid()`` changes) and ends the process with exit code
    :data:`EXIT_LAUNCHER_DIED` (75). Completed shards are safe (atomic writes) and the output
    folder's lock is released by the kernel; rerun the command to resume.

    Started once per process, only under a launcher (``WORLD_SIZE > 1``). Set
    ``CAPTUM_NORMGRAD_NO_LAUNCHER_WATCH=1`` to turn it off.

    Returns:
        bool: whether a watcher runs (now or already).
    """
    if os.environ.get("CAPTUM_NORMGRAD_NO_LAUNCHER_WATCH"):
        return False
    if "thread" in _WATCHING:
        return True
    parent = os.getppid()
    if parent <= 1:  # already orphaned (or started by init): nothing to watch
        return False

    def loop() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                try:
                    sys.stderr.write(
                        f"captum-normgrad run: rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): the launcher "
                        f"(pid {parent}) died; exiting. Completed shards are kept: rerun the same command to resume\n"
                    )
                    sys.stderr.flush()
                finally:
                    os._exit(EXIT_LAUNCHER_DIED)

    t = threading.Thread(target=loop, name="captum-normgrad-launcher-watch", daemon=True)
    t.start()
    _WATCHING["thread"] = t
    _WATCHING["parent"] = parent
    return True

class _Dist:
    """Process-group handle: joins an existing group, starts one under torchrun, or runs alone."""

    def __init__(self, cfg: RunConfig) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "auto":
            use_cuda = torch.cuda.is_available()
            self.device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
        elif cfg.device == "cpu":
            self.device = torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; use device = 'auto' or 'cpu'")
            self.device = torch.device(cfg.device) if ":" in cfg.device else torch.device("cuda", local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if dist.is_available() and dist.is_initialized():
            self.active = dist.get_world_size() > 1
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_available():
                raise RuntimeError(
                    "WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process instead"
                )
            watch_launcher()
            dist.init_process_group(backend=self.backend, timeout=timedelta(seconds=float(cfg.timeout_s)))
            self.created = True
            self.active = True
        else:
            self.active = False
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def close(self) -> None:
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    """What a run did. ``str(report)`` is the human summary printed by the CLI.

    Attributes:
        output (str): the output directory.
        config_hash (str): hash of the configuration (and dataset size).
        world_size (int): number of processes of this run.
        num_samples (int): samples in the (limited) dataset.
        samples_written (int): samples in the output (all shards, this run and earlier ones).
        samples_computed (int): samples computed by this run (all ranks).
        shards_total, shards_computed, shards_skipped (int): shard counts; skipped = already
                    complete from an earlier run.
        failed (list[dict]): unreadable samples (``id``, ``index``, ``error``), skipped.
        seconds (float): wall-clock seconds of the processing phase (slowest rank).
        total_seconds (float): wall-clock seconds of the whole call on rank 0 (set-up included).
        samples_per_s (float): ``samples_computed / seconds``.
        per_rank (list[dict]): per rank: shards, samples, seconds, CPU seconds of the process,
                    samples/s.
        statistics (str, optional): path of the merged statistics file.
        changes (list[str]): inputs found changed on resume and recomputed (``on_change =
                    "recompute"``), and a stale lock taken over.
    """

    output: str
    config_hash: str
    world_size: int
    num_samples: int
    samples_written: int
    samples_computed: int
    shards_total: int
    shards_computed: int
    shards_skipped: int
    failed: List[Dict[str, Any]]
    seconds: float
    total_seconds: float
    samples_per_s: float
    per_rank: List[Dict[str, Any]] = field(default_factory=list)
    statistics: Optional[str] = None
    changes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"run {self.config_hash} -> {self.output}",
            f"  samples: {self.samples_written}/{self.num_samples} in the output "
            f"({self.samples_computed} computed now, {len(self.failed)} unreadable)",
            f"  shards: {self.shards_total} ({self.shards_computed} computed, {self.shards_skipped} already complete)",
            f"  time: {self.seconds:.2f} s processing, {self.total_seconds:.2f} s in all; "
            f"{self.samples_per_s:.2f} samples/s on {self.world_size} process(es)",
        ]
        for r in self.per_rank:
            lines.append(
                f"    rank {r['rank']}: {r['samples_computed']} samples in {r['shards_computed']} shards "
                f"({r['shards_skipped']} skipped), {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU), "
                f"{r['samples_per_s']:.2f} samples/s"
            )
        if self.statistics:
            lines.append(f"  statistics: {self.statistics}")
        for c in self.changes:
            lines.append(f"  note: {c}")
        if self.failed:
            lines.append(f"  unreadable samples skipped ({len(self.failed)}):")
            for f in self.failed[:50]:
                lines.append(f"    [{f['index']}] {f['id']}: {f['error']}")
            if len(self.failed) > 50:
                lines.append(f"    ... and {len(self.failed) - 50} more (see index.json)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# output directory
# ---------------------------------------------------------------------------------------------
def _check_output_usable(out: Path) -> None:
    """Refuse a path that is a file, or a folder of foreign files (before any write into it)."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {str(out)!r} exists and is not a folder; choose a folder path")
    if out.is_dir() and not (out / "run.json").is_file() and not (out / "run.json").is_symlink():
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        if foreign:
            raise OutputDirError(
                f"output directory {str(out)!r} is not empty and is not a runner output (no run.json; holds "
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
            )


def _input_changes(prev: Optional[Mapping[str, Any]], now: Mapping[str, Any]) -> List[str]:
    """What differs between the recorded and the current model-side input fingerprints."""
    if not isinstance(prev, Mapping):  # a folder written before fingerprints existed
        return []
    out: List[str] = []
    for key in sorted(set(prev) | set(now)):
        a, b = prev.get(key), now.get(key)
        if a is None or b is None:
            out.append(f"{key} {'added' if a is None else 'removed'}")
            continue
        why = fingerprint_changed(a, b)
        if why:
            out.append(f"{key} {str(b.get('path', ''))!r} changed since this folder was started ({why})")
    return out


def _invalidate(out: Path, shards: Optional[Sequence[int]] = None) -> None:
    """Drop completion markers (all, or of ``shards``) and the run-level files derived from them."""
    markers = (
        sorted((out / SHARD_DIR).glob("shard-*.done.json"))
        if shards is None
        else [shard_paths(out, s)[1] for s in shards]
    )
    for pth in markers + [out / "index.json", out / "report.json", out / STATISTICS_FILE]:
        try:
            pth.unlink()
        except FileNotFoundError:
            pass
    from .storage import _fsync_dir

    _fsync_dir(out / SHARD_DIR)
    _fsync_dir(out)


def _prepare_output(out: Path, cfg: RunConfig, h: str, run_info: Dict[str, Any]) -> List[str]:
    """Create ``out`` for this configuration, or check that it holds this configuration's run.

    Returns the input changes found (and acted on, with ``on_change = "recompute"``).
    """
    _check_output_usable(out)
    run_json = out / "run.json"
    if run_json.is_file():
        try:
            prev = json.loads(run_json.read_text(encoding="utf-8"))
            prev_hash = prev["config_hash"]
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise OutputDirError(
                f"{run_json} is unreadable ({e}); this folder cannot be resumed safely. Delete it or choose another output"
            ) from None
        if prev_hash != h:
            changed = diff_configs(
                {"config": prev.get("config", {}), **prev.get("extra", {})},
                {"config": cfg.hashed_dict(), **run_info["extra"]},
            )
            what = ", ".join(changed) if changed else "unknown fields"
            raise OutputDirError(
                f"output directory {str(out)!r} holds a run of a different configuration (its hash {prev_hash}, this "
                f"configuration {h}; differing: {what}). Resuming would mix incompatible results: use another output "
                "directory, or delete this one to start over"
            )
        changes = _input_changes(prev.get("inputs"), run_info["inputs"])
        if changes:
            if cfg.on_change != "recompute":
                raise OutputDirError(
                    f"output directory {str(out)!r} was computed from other inputs: {'; '.join(changes)}. Resuming "
                    "would mix maps of the old and the new model in one folder: rerun with --on-change recompute "
                    "(on_change = 'recompute') to recompute every shard, restore the original file, or choose "
                    "another output"
                )
            _invalidate(out)
            atomic_write_json(run_json, {**prev, "inputs": run_info["inputs"]})
            changes = [c + "; every shard recomputed" for c in changes]
        remove_stale_temporaries(out)
        (out / SHARD_DIR).mkdir(exist_ok=True)
        return changes
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_json, {**run_info, "config_hash": h, "config": cfg.hashed_dict()})
    return []


def _changed_images(
    out: Path, h: str, ranges: Sequence[range], files: Sequence[Path], ids: Any, mode: str
) -> Dict[int, List[str]]:
    """Complete shards whose image files changed since they were computed: ``{shard: [reasons]}``."""
    found: Dict[int, List[str]] = {}
    for s, r in enumerate(ranges):
        m = shard_is_complete(out, s, h, "size")
        rec = None if m is None else m.get("inputs")
        if not isinstance(rec, list) or len(rec) != len(r):
            continue
        for i, old in zip(r, rec):
            if not isinstance(old, Mapping):
                continue
            now = file_fingerprint(files[i], "content" if (mode == "content" and "sha256" in old) else "stat")
            why = fingerprint_changed(old, now)
            if why:
                found.setdefault(s, []).append(f"{ids(i)!r}: {why}")
    return found


# ---------------------------------------------------------------------------------------------
# one shard
# ---------------------------------------------------------------------------------------------
def _stack(views: Sequence[SampleView]) -> Tensor:
    shapes = {tuple(v.input.shape) for v in views}  # type: ignore[union-attr]
    if len(shapes) > 1:
        raise ValueError(
            f"samples of one batch have different shapes {sorted(shapes)}; set dataset.image_size = [h, w] "
            "(or a transform) so that every image has the same size"
        )
    return torch.stack([v.input for v in views])  # type: ignore[misc]


def _targets(cfg: RunConfig, labels: Tensor, pred: Tensor, ids: Sequence[str]) -> Tensor:
    if cfg.target == "prediction":
        return pred
    if cfg.target == "label":
        if (labels < 0).any():
            bad = [i for i, l in zip(ids, labels.tolist()) if l < 0][:3]
            raise ValueError(
                f"target = 'label' but the dataset gives no label for {bad}; use target = 'prediction' (or a class "
                "index), or give a dataset with labels (class sub-folders for a folder dataset)"
            )
        return labels
    return torch.full_like(labels, int(cfg.target))


class _Computer:
    """Everything needed to turn a list of sample indices into shard tensors."""

    def __init__(self, cfg: RunConfig, model: nn.Module, dataset: SafeDataset, device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.dataset = dataset
        self.device = device
        self.methods = build_methods(cfg, model)
        self.stats = cfg.statistics.parameter_saliency
        self.saliency = None
        self.num_features = 0
        if self.stats:
            from ..parameter_saliency import ParameterSaliency

            self.saliency = ParameterSaliency(
                model, aggregation=cfg.statistics.aggregation, parameters=cfg.statistics.parameters
            )
            self.num_features = self.saliency.num_features
        self.map_dtype = _MAP_DTYPES[cfg.map_dtype]
        self.files: Optional[List[Path]] = None  # image file of each sample, fingerprinted per shard

    def profiles(self, x: Tensor, labels: Tensor, ids: Sequence[str]) -> Tensor:
        if (labels < 0).any():
            bad = [i for i, l in zip(ids, labels.tolist()) if l < 0][:3]
            raise ValueError(
                f"parameter-saliency statistics need the true label of every sample; none for {bad} (a flat "
                "image folder has no labels: use class sub-folders, or turn statistics off)"
            )
        return self.saliency.profiles(x, labels)  # type: ignore[union-attr]

    def warm_up(self, index: int) -> None:
        v = self.dataset[index]
        if not v.ok:
            return
        x = v.input.unsqueeze(0).to(self.device)  # type: ignore[union-attr]
        with torch.no_grad():
            logits = self.model(x)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            return
        pred = logits.argmax(1)
        label = torch.tensor([v.label], dtype=torch.int64, device=self.device)
        target = pred if (self.cfg.target == "label" and v.label < 0) else _targets(self.cfg, label, pred, [v.id])
        for m in self.methods:
            m.maps(x, target)
        if self.stats and v.label >= 0:
            self.profiles(x, label, [v.id])

    def shard(self, indices: range, bar: Any) -> Tuple[Dict[str, Tensor], Dict[str, Any], Optional[WelfordState]]:
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(
            Subset(self.dataset, list(indices)),
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            collate_fn=collate_views,
        )
        cols: Dict[str, List[Tensor]] = {}
        meta: Dict[str, List[Any]] = {"indices": [], "ids": [], "targets": [], "predictions": [], "failed": []}
        state = WelfordState(self.num_features) if self.stats else None
        if self.files is not None:  # taken before reading: a file changed later shows on resume
            meta["inputs"] = [file_fingerprint(self.files[i], self.cfg.fingerprint) for i in indices]
        for views in loader:
            ok = [v for v in views if v.ok]
            meta["failed"].extend({"index": v.index, "id": v.id, "error": v.error} for v in views if not v.ok)
            if ok:
                x = _stack(ok).to(self.device)
                labels = torch.tensor([v.label for v in ok], dtype=torch.int64, device=self.device)
                ids = [v.id for v in ok]
                with torch.no_grad():
                    logits = self.model(x)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ValueError(
                        "the runner needs a classifier returning (N, classes) logits; got "
                        f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}"
                    )
                pred = logits.argmax(1)
                target = _targets(self.cfg, labels, pred, ids)
                batch: Dict[str, Tensor] = {
                    "index": torch.tensor([v.index for v in ok], dtype=torch.int64),
                    "target": target.cpu(),
                    "prediction": pred.cpu(),
                }
                for m in self.methods:
                    for k, t in m.maps(x, target).items():
                        batch[k] = t.to(device="cpu", dtype=self.map_dtype if t.is_floating_point() else t.dtype)
                for k, t in batch.items():
                    cols.setdefault(k, []).append(t)
                if state is not None:
                    state.update(self.profiles(x, labels, ids))
                meta["indices"].extend(v.index for v in ok)
                meta["ids"].extend(ids)
                meta["targets"].extend(int(t) for t in target.tolist())
                meta["predictions"].extend(int(p) for p in pred.tolist())
            if bar is not None:
                bar.update(len(views))
        tensors = {k: torch.cat(v) for k, v in cols.items()}
        if not tensors:  # every sample of the shard unreadable
            tensors = {k: torch.zeros(0, dtype=torch.int64) for k in ("index", "target", "prediction")}
        if state is not None:
            tensors["stats/welford"] = state.pack().cpu()
        return tensors, meta, state


# ---------------------------------------------------------------------------------------------
# preprocessing, dataset, input fingerprints, up-front checks
# ---------------------------------------------------------------------------------------------
class CoverResize:
    """Resize a PIL image so that it covers ``(h, w)`` keeping its aspect ratio, then centre-crop
    ``(h, w)``: what torchvision's presets do (resize the short side, centre crop), for any target
    aspect ratio. Non-square images are cropped, never squashed.
    """

    def __init__(self, size: Sequence[int], interpolation: Any = None) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def __call__(self, im: Any) -> Any:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        w0, h0 = im.size
        h, w = self.size
        scale = max(h / h0, w / w0)
        nh, nw = max(h, int(round(h0 * scale))), max(w, int(round(w0 * scale)))
        im = TF.resize(im, [nh, nw], interpolation=self.interpolation or InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(im, [h, w])

    def __repr__(self) -> str:
        return f"CoverResize(size={self.size})"


def _torchvision_weights(cfg: RunConfig, default: bool) -> Any:
    """The torchvision weights entry of a torchvision model: the named one, else (``default``)
    the model's default weights (whose preprocessing a checkpoint of that architecture expects)."""
    spec = cfg.model
    if spec.source != "torchvision" or not spec.name:
        return None
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(spec.name)
    except (ValueError, KeyError):
        return None
    if spec.weights is not None:
        key = str(spec.weights).split(".")[-1]
        if key in enum.__members__:
            return enum[key]
    return enum.DEFAULT if default else None


def preprocessing(cfg: RunConfig) -> Tuple[Optional[Callable[[Any], Tensor]], Dict[str, Any]]:
    """The image transform of a folder / torchvision dataset, and what it does (hashed).

    See :class:`~captum_normgrad.runner.DatasetSpec` (``preprocess``, ``resize``, ``image_size``,
    ``mean``, ``std``). Warns when a torchvision model gets images without normalisation.

    Returns:
        (transform, description): ``(None, {...})`` for generated and factory datasets (they
        bring their own).
    """
    spec = cfg.dataset
    if spec.kind not in ("folder", "torchvision"):
        return None, {"by": "the dataset"}
    from torchvision import transforms as T

    if spec.kind == "folder" and spec.mean is not None and len(spec.mean) != 3:
        raise ValueError(
            f"dataset mean/std have {len(spec.mean)} values but the images of a folder dataset are read as RGB "
            "(3 channels); give 3 values each, e.g. mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]"
        )
    entry = _torchvision_weights(cfg, default=spec.preprocess == "weights") if spec.preprocess != "manual" else None
    if spec.preprocess == "weights" and entry is None:
        raise ValueError(
            "dataset preprocess = 'weights' needs a torchvision classification model (model.source = 'torchvision' "
            f"and a name with weights), got model source {cfg.model.source!r} name {cfg.model.name!r}; use "
            "preprocess = 'manual' with image_size/mean/std"
        )
    desc: Dict[str, Any] = {"by": "config", "resize": spec.resize}
    steps: List[Any] = []
    mean, std = spec.mean, spec.std
    interp = None
    if entry is not None:
        base = entry.transforms()
        interp = base.interpolation
        desc.update(by=f"weights {type(entry).__name__}.{entry.name}", interpolation=str(interp.value))
        if mean is None:
            mean, std = [float(v) for v in base.mean], [float(v) for v in base.std]
    if spec.image_size is not None:
        size = tuple(spec.image_size)
        steps.append(CoverResize(size, interp) if spec.resize == "crop" else T.Resize(size, antialias=True))
        desc["size"] = list(size)
    elif entry is not None:
        resize, crop = int(base.resize_size[0]), int(base.crop_size[0])
        steps += [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(crop)]
        desc.update(resize_short_side=resize, centre_crop=crop)
    steps.append(T.ToTensor())
    if mean is not None:
        steps.append(T.Normalize(list(mean), list(std)))  # type: ignore[arg-type]
        desc.update(mean=list(mean), std=list(std))
    elif cfg.model.source == "torchvision":
        warnings.warn(
            f"torchvision model {cfg.model.name!r} gets the {spec.kind} dataset's images in [0, 1] without "
            "normalisation, but torchvision models expect their weights' mean/std (ImageNet: mean = [0.485, 0.456, "
            "0.406], std = [0.229, 0.224, 0.225]): the maps would explain out-of-distribution inputs. Set dataset "
            "preprocess = 'weights', or dataset mean/std (mean = [0, 0, 0], std = [1, 1, 1] states that [0, 1] "
            "inputs are intended)",
            UserWarning,
            stacklevel=3,
        )
    return T.Compose(steps), desc


def _build_dataset(cfg: RunConfig, transform: Optional[Callable[[Any], Tensor]]) -> Any:
    spec = cfg.dataset
    if spec.kind == "folder":
        return ImageFolderDataset(cfg.resolve_path(spec.root or "."), transform=transform)
    if spec.kind == "torchvision" and transform is not None and "transform" not in spec.kwargs:
        c = copy.copy(cfg)
        c.dataset = dataclasses.replace(spec, kwargs={**spec.kwargs, "transform": transform})
        return resolve_dataset(c)
    return resolve_dataset(cfg)


def _sample_files(ds: Any, n: int) -> Optional[List[Path]]:
    """The image file of each of the first ``n`` samples, when the dataset says (``.samples`` of
    ``(path, label)``, as :class:`ImageFolderDataset` and ``torchvision.datasets.ImageFolder``)."""
    samples = getattr(ds, "samples", None)
    if not isinstance(samples, (list, tuple)) or len(samples) < n:
        return None
    files: List[Path] = []
    for item in samples[:n]:
        head = item[0] if isinstance(item, (tuple, list)) and item else None
        if not isinstance(head, (str, Path)):
            return None
        files.append(Path(head))
    return files


def _code_file(factory: Optional[str], base_dir: str) -> Optional[Path]:
    mod = (factory or "").rpartition(":")[0]
    if not (mod.endswith(".py") or "/" in mod or "\\" in mod):
        return None
    q = Path(mod).expanduser()
    return q if q.is_absolute() else Path(base_dir) / q


def _model_inputs(cfg: RunConfig, user_model: bool, user_ds: bool) -> Dict[str, Dict[str, Any]]:
    """Content fingerprints (sha256, streamed) of the files the maps depend on besides the images:
    the checkpoint, a benchmark weights file, ``file.py`` factories (their code builds the model
    or the data)."""
    found: Dict[str, Path] = {}
    m = cfg.model
    if not user_model:
        if m.checkpoint:
            found["model.checkpoint"] = cfg.resolve_path(m.checkpoint)
        if m.source == "benchmark" and m.weights and m.weights.lower() not in ("default", "none", "random"):
            found["model.weights"] = cfg.resolve_path(m.weights)
        if m.source == "factory":
            p = _code_file(m.factory, cfg.base_dir)
            if p is not None:
                found["model.factory"] = p
    if not user_ds and cfg.dataset.kind == "factory":
        p = _code_file(cfg.dataset.factory, cfg.base_dir)
        if p is not None:
            found["dataset.factory"] = p
    return {k: {"path": str(p), **file_fingerprint(p, "content")} for k, p in found.items()}


def _check_data_fits(cfg: RunConfig, ds: SafeDataset, n: int, model: nn.Module, device: torch.device) -> None:
    """Before any output is written: the first samples can be read and the model takes them.

    A configuration that does not fit the data (``mean`` of the wrong length, a transform that
    fails, images the model cannot take) would otherwise make every sample "unreadable" and the run
    look like data loss.
    """
    k = min(n, 8)
    views = [ds[i] for i in range(k)]
    ok = [v for v in views if v.ok]
    if not ok:
        first = views[0]
        raise ValueError(
            f"none of the first {k} samples could be read; first: [{first.index}] {first.id}: {first.error}. "
            "When every sample fails this is the configuration (dataset mean/std length, image_size, transform, "
            "root), not the data: fix it and rerun"
        )
    x: Tensor = ok[0].input  # type: ignore[assignment]  # a readable view holds a tensor
    try:
        with torch.no_grad():
            model(x.unsqueeze(0).to(device))
    except Exception as e:
        reason = " ".join(str(e).split())[:300]
        raise ValueError(
            f"the model cannot take the dataset's samples: sample {ok[0].id!r} of shape {tuple(x.shape)} fails in "
            f"forward ({type(e).__name__}: {reason}); check dataset image_size / mean / std (channels) against the model"
        ) from None


def _load_shard_state(out: Path, shard: int) -> WelfordState:
    from safetensors import safe_open

    path, _ = shard_paths(out, shard)
    with safe_open(str(path), framework="pt") as f:
        return WelfordState.unpack(f.get_tensor("stats/welford"))


def _progress(cfg: RunConfig, rank: int, world: int, total: int, initial: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        position=rank,
        desc=f"rank {rank}/{world}",
        unit="sample",
        dynamic_ncols=True,
        leave=True,
    )


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run(
    config: Union[RunConfig, str, Path],
    *,
    model: Optional[nn.Module] = None,
    dataset: Optional[Any] = None,
) -> RunReport:
    """Compute attribution maps (and statistics) for a whole dataset into a resumable output folder.

    Call it the same way in one process or in every process started by
    ``torchrun --nproc_per_node=N``: under torchrun (``WORLD_SIZE > 1``) a process group is started
    (``gloo`` on CPU, ``nccl`` on GPU) unless one is already initialised, and each rank computes the
    shards ``k % world_size == rank``. Completed shards found in the output folder are skipped; an
    output folder written by another configuration is refused. Rank 0 holds a lock on the output
    folder for the whole run.

    Args:
        config (RunConfig, str or Path): the configuration, or the path of a ``.toml``/``.json`` file.
        model (nn.Module, optional): use this model instead of ``config.model`` (a deep copy is
                    used; the caller's model is never modified). Its state enters the configuration
                    hash.
                    Default: None
        dataset (Dataset, optional): use this map-style dataset instead of ``config.dataset``
                    (items ``(image, label)``; an optional ``sample_id(i)`` method names samples).
                    Default: None

    Returns:
        *RunReport*: the same report on every rank (samples, seconds, samples/s, per-rank figures,
        unreadable samples).

    Raises:
        OutputDirError: the output folder holds another configuration's run or foreign files, or
                    was computed from another checkpoint / other image files (with
                    ``on_change = "error"``), naming what changed.
        OutputLockedError: another run holds the output folder's lock (its pid, host and start
                    time are named), or the lock file is a symlink.
        ShardWriteError: a shard could not be written (it is not marked complete; rerun to resume).
        RunFailedError: every sample failed (a configuration or data error, never a success).
        ValueError, TypeError: an invalid configuration, or one that does not fit the data (checked
                    on the first samples before anything is written), with the fix in the message.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    cfg.validate()
    t_call = time.perf_counter()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        d = _Dist(cfg)
        try:
            return _run(cfg, d, model, dataset, t_call)
        finally:
            d.close()
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: RunConfig, d: _Dist, user_model: Optional[nn.Module], user_ds: Optional[Any], t_call: float) -> RunReport:
    out = cfg.output_dir
    transform, pre_desc = preprocessing(cfg) if user_ds is None else (None, {"by": "the dataset"})
    ds = _build_dataset(cfg, transform) if user_ds is None else user_ds
    n = dataset_length(ds)
    if cfg.dataset.limit is not None:
        n = min(n, cfg.dataset.limit)
    if n == 0:
        raise ValueError("the dataset is empty; nothing to run")
    # fingerprints of the checkpoint / factory files BEFORE loading them: a file replaced in between
    # then shows as a change on resume (a false alarm), never as a silent mix
    inputs = _model_inputs(cfg, user_model is not None, user_ds is not None)
    if user_model is not None:
        if not isinstance(user_model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(user_model).__name__}")
        model = copy.deepcopy(user_model)
    else:
        model = resolve_model(cfg)
    model = model.eval().to(d.device)
    for p in model.parameters():  # the runner's own copy: no write into a caller's model
        p.grad = None
    extra: Dict[str, Any] = {"num_samples": n}
    if user_model is not None:
        extra["model_fingerprint"] = model_fingerprint(user_model)
    if user_ds is not None:
        extra["dataset_class"] = f"{type(user_ds).__module__}.{type(user_ds).__qualname__}"
    if transform is not None:  # the resolved preprocessing (e.g. a torchvision weights' sizes and mean/std)
        extra["preprocess"] = pre_desc
    safe_ds = SafeDataset(ds)
    if callable(getattr(ds, "sample_id", None)):  # e.g. the file list of a folder: added files are a change
        extra["sample_ids_sha256"] = hashlib.sha256("\n".join(safe_ds.sample_id(i) for i in range(n)).encode()).hexdigest()[:16]
    h = config_hash(cfg, extra)
    ranges = shard_ranges(n, cfg.shard_size)
    _check_data_fits(cfg, safe_ds, n, model, d.device)  # a config that does not fit the data fails here
    computer = _Computer(cfg, model, safe_ds, d.device)  # resolves methods/layers before any write
    files = _sample_files(ds, n)
    computer.files = files

    # rank 0 locks and prepares (or checks) the output folder; every rank raises (none waits forever)
    err: Optional[str] = None
    failure: Optional[BaseException] = None
    lock: Optional[OutputLock] = None
    changes: List[str] = []
    if d.rank == 0:
        try:
            _check_output_usable(out)
            out.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(out).acquire()
            if lock.unsupported:
                warnings.warn(
                    f"could not lock the output folder {str(out)!r} ({lock.unsupported}); two runs started on it at "
                    "once would not be detected",
                    RuntimeWarning,
                    stacklevel=3,
                )
            if lock.previous_owner:
                po = lock.previous_owner
                changes.append(
                    f"took over the lock left by pid {po.get('pid')} on {po.get('host')} (started {po.get('started')}), "
                    "which ended without releasing it (killed?)"
                )
            changes += _prepare_output(
                out,
                cfg,
                h,
                {
                    "format": FORMAT,
                    "num_samples": n,
                    "num_shards": len(ranges),
                    "shard_size": cfg.shard_size,
                    "extra": extra,
                    "inputs": inputs,
                },
            )
            if files is not None:
                changed = _changed_images(out, h, ranges, files, safe_ds.sample_id, cfg.fingerprint)
                if changed:
                    k = sum(len(v) for v in changed.values())
                    first = "; ".join([r for v in changed.values() for r in v][:3]) + ("; ..." if k > 3 else "")
                    if cfg.on_change != "recompute":
                        raise OutputDirError(
                            f"{k} image file(s) changed since their maps were computed into {str(out)!r} ({first}); "
                            "resuming would mix maps of old and new images. Rerun with --on-change recompute "
                            f"(on_change = 'recompute') to recompute the {len(changed)} affected shard(s), restore "
                            "the images, or choose another output"
                        )
                    _invalidate(out, sorted(changed))
                    changes.append(f"{k} image file(s) changed ({first}): shards {sorted(changed)} recomputed")
        except (OutputDirError, OSError) as e:
            if lock is not None:
                lock.release()
                lock = None
            failure, err = e, str(e)
    err = d.broadcast_object(err)
    if failure is not None:
        raise failure
    if err is not None:
        raise OutputDirError(f"rank 0 could not use the output directory: {err}")
    try:
        report = _compute(cfg, d, out, h, n, ranges, computer, t_call, changes)
    finally:
        if lock is not None:
            lock.release()
    if report.samples_written == 0:
        f0 = report.failed[0] if report.failed else {"index": "?", "id": "?", "error": "unknown"}
        raise RunFailedError(
            f"no sample could be computed: all {report.num_samples} failed (first: [{f0['index']}] {f0['id']}: "
            f"{f0['error']}). A run where every sample fails is a configuration or data error; the list is in "
            f"{str(out / 'index.json')!r}"
        )
    return report


def _compute(
    cfg: RunConfig,
    d: _Dist,
    out: Path,
    h: str,
    n: int,
    ranges: List[range],
    computer: "_Computer",
    t_call: float,
    changes: List[str],
) -> RunReport:
    """Every rank: compute its incomplete shards; rank 0 then checks and indexes the whole output."""
    mine = shards_of_rank(len(ranges), d.rank, d.world)
    done: Dict[int, Dict[str, Any]] = {}
    for s in mine:
        m = shard_is_complete(out, s, h, cfg.verify)
        if m is not None:
            done[s] = m
    todo = [s for s in mine if s not in done]
    bar = _progress(cfg, d.rank, d.world, sum(len(ranges[s]) for s in mine), sum(len(ranges[s]) for s in done))
    states: Dict[int, WelfordState] = {}
    computed = 0
    if todo:  # warm-up on one sample (first-call costs of autograd / torch.func stay out of the timing)
        computer.warm_up(ranges[todo[0]][0])
    d.barrier()
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        for s in todo:
            ts = time.perf_counter()
            tensors, meta, state = computer.shard(ranges[s], bar)
            marker = {
                "config_hash": h,
                "rank": d.rank,
                "num_samples": len(meta["indices"]),
                "seconds": round(time.perf_counter() - ts, 6),
                **meta,
            }
            write_shard(out, s, tensors, marker, metadata={"format": FORMAT, "config_hash": h, "shard": str(s)})
            computed += len(meta["indices"]) + len(meta["failed"])
            if state is not None:
                states[s] = state
            if bar is not None and d.rank == 0:
                n_done = len(list((out / SHARD_DIR).glob("shard-*.done.json")))
                bar.set_postfix_str(f"all ranks: {n_done}/{len(ranges)} shards", refresh=True)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    if computer.stats:
        for s in done:
            states[s] = _load_shard_state(out, s)

    mine_summary = {
        "rank": d.rank,
        "shards_computed": len(todo),
        "shards_skipped": len(done),
        "samples_computed": computed,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "samples_per_s": computed / seconds if seconds > 0 else 0.0,
        "stats": {s: st.pack().cpu() for s, st in states.items()},
    }
    gathered = d.all_gather_object(mine_summary)

    merged: Optional[WelfordState] = None
    if computer.stats:
        # per-shard states from every rank, merged in shard order: independent of the world size
        all_states: Dict[int, WelfordState] = {}
        for g in gathered:
            for s, packed in g["stats"].items():
                all_states[int(s)] = WelfordState.unpack(packed)
        missing = [s for s in range(len(ranges)) if s not in all_states]
        if missing:
            raise RuntimeError(f"statistics missing for shards {missing[:10]}")
        merged = merge_states([all_states[s] for s in range(len(ranges))], computer.num_features)

    per_rank = [{k: v for k, v in g.items() if k != "stats"} for g in gathered]
    report_dict: Optional[Dict[str, Any]] = None
    err = None
    if d.rank == 0:
        try:
            report_dict = _finish(out, cfg, h, n, ranges, per_rank, merged, computer.saliency, d.world, t_call, changes)
        except Exception as e:  # shared with the other ranks, then raised everywhere
            err = f"{type(e).__name__}: {e}"
            if not d.active:
                raise
    report_dict, err = d.broadcast_object((report_dict, err))
    if err is not None:
        raise RuntimeError(f"rank 0 could not finish the run: {err}")
    return RunReport(**report_dict)


def _write_final(path: Path, obj: Any) -> None:
    """Atomic write of a run-level file; a failure names the file, the cause and the way out."""
    try:
        if isinstance(obj, bytes):
            atomic_write_bytes(path, obj)
        else:
            atomic_write_json(path, obj)
    except OSError as e:
        raise OSError(
            e.errno,
            f"could not write {path} ({e.strerror or e}); every shard is complete and kept: free disk space (or fix "
            "permissions) and rerun the same command, which only writes the index",
        ) from e


def _finish(
    out: Path,
    cfg: RunConfig,
    h: str,
    n: int,
    ranges: List[range],
    per_rank: List[Dict[str, Any]],
    merged: Optional[WelfordState],
    saliency: Any,
    world: int,
    t_call: float,
    changes: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Rank 0: check every shard, write index.json, statistics and report.json."""
    samples: List[Dict[str, Any]] = []
    failed: List[Dict[str, Any]] = []
    for s, r in enumerate(ranges):
        m = shard_is_complete(out, s, h, "size")
        if m is None:
            raise RuntimeError(f"shard {s} is not complete after the run; rerun the same command to resume")
        for row, (i, sid, t, p) in enumerate(zip(m["indices"], m["ids"], m["targets"], m["predictions"])):
            samples.append({"id": sid, "index": i, "target": t, "prediction": p, "shard": s, "row": row})
        failed.extend(m["failed"])
        got = sorted(list(m["indices"]) + [f["index"] for f in m["failed"]])
        if got != list(r):
            raise RuntimeError(f"shard {s} holds samples {got[:5]}... instead of {r}; delete it and rerun")
    seen = [x["index"] for x in samples] + [f["index"] for f in failed]
    if len(seen) != n or len(set(seen)) != n:
        raise RuntimeError(f"the output holds {len(seen)} sample entries for {n} samples ({len(set(seen))} distinct)")
    samples.sort(key=lambda x: x["index"])
    failed.sort(key=lambda x: x["index"])
    _write_final(
        out / "index.json",
        {"format": FORMAT, "config_hash": h, "num_samples": n, "num_shards": len(ranges), "samples": samples, "failed": failed},
    )
    stats_path: Optional[str] = None
    if merged is not None:
        # ParameterSaliency's own format (statistics + identity of the profiled parameters)
        import io

        saliency.statistics = merged
        buf = io.BytesIO()
        torch.save({**saliency.state_dict(), "runner_config_hash": h}, buf)
        _write_final(out / STATISTICS_FILE, buf.getvalue())
        stats_path = str(out / STATISTICS_FILE)
    seconds = max(r["seconds"] for r in per_rank)
    computed = sum(r["samples_computed"] for r in per_rank)
    report = RunReport(
        output=str(out),
        config_hash=h,
        world_size=world,
        num_samples=n,
        samples_written=len(samples),
        samples_computed=computed,
        shards_total=len(ranges),
        shards_computed=sum(r["shards_computed"] for r in per_rank),
        shards_skipped=sum(r["shards_skipped"] for r in per_rank),
        failed=failed,
        seconds=seconds,
        total_seconds=time.perf_counter() - t_call,
        samples_per_s=computed / seconds if seconds > 0 else 0.0,
        per_rank=per_rank,
        statistics=stats_path,
        changes=list(changes or []),
    )
    rd = report.to_dict()
    _write_final(out / "report.json", {**rd, "python": platform.python_version(), "torch": torch.__version__})
    return rd
