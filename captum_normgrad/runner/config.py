"""The run configuration: dataclasses, loading from TOML or JSON, validation and the config hash.

A configuration says *what* to compute (dataset, model, methods, layers, shard geometry, targets,
statistics) and *how* to run it (device, workers, threads, progress). Only the *what* enters the
configuration hash that guards an output directory, so a run may be resumed on another device, with
another number of processes or workers, or from a moved output directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "DatasetSpec",
    "ModelSpec",
    "MethodSpec",
    "StatisticsSpec",
    "RunConfig",
    "load_config",
    "config_hash",
]

DATASET_KINDS = ("folder", "torchvision", "generated", "factory")
MODEL_SOURCES = ("torchvision", "factory", "benchmark")
TARGET_MODES = ("label", "prediction")
MAP_DTYPES = ("float32", "float16", "bfloat16")
PREPROCESS_MODES = ("auto", "weights", "manual")
RESIZE_MODES = ("crop", "stretch")
FINGERPRINT_MODES = ("stat", "content")
ON_CHANGE_MODES = ("error", "recompute")


def _check_keys(section: str, data: Mapping[str, Any], cls: type) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in [{section}] of the run configuration; "
            f"allowed keys: {', '.join(sorted(allowed))}"
        )


def _size_pair(v: Any, what: str) -> Optional[List[int]]:
    if v is None:
        return None
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an int or [height, width], got {v!r}")
    if isinstance(v, int):
        v = [v, v]
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v)):
        raise ValueError(f"{what} must be a positive int or [height, width], got {v!r}")
    return [int(v[0]), int(v[1])]


@dataclass
class DatasetSpec:
    """Where the samples come from.

    Attributes:
        kind (str): ``"folder"`` (image files; class sub-folders give labels, a flat folder gives
                    none), ``"torchvision"`` (a ``torchvision.datasets`` class by ``name``),
                    ``"generated"`` (the package's built-in generated dataset) or ``"factory"``
                    (``factory = "package.module:callable"`` or ``"path/to/file.py:callable"``
                    returning a map-style dataset).
        root (str, optional): folder of the images / torchvision root. Relative paths are taken
                    relative to the configuration file.
        name (str, optional): torchvision dataset class (``"CIFAR10"``) or generated split name.
        factory (str, optional): ``module:callable`` for ``kind="factory"``.
        kwargs (dict): extra keyword arguments for the dataset class or factory.
        image_size (int or [h, w], optional): resize images to this size (folder/torchvision);
                    required for folders whose images differ in size.
        mean, std (list[float], optional): per-channel normalisation applied after ``ToTensor``
                    (one value per channel: 3 for the RGB images of a folder).
        limit (int, optional): use only the first ``limit`` samples.
        preprocess (str): ``"auto"`` (default): a torchvision model with named ``weights`` gets
                    those weights' own ``transforms()`` (resize, centre crop, mean/std), as
                    ``explain`` does, and ``image_size``/``mean``/``std`` given here override its
                    parts; other models get exactly ``image_size``/``mean``/``std``.
                    ``"weights"``: the torchvision weights' preprocessing (the model's default
                    weights' when it has random or checkpoint weights). ``"manual"``: only
                    ``image_size``/``mean``/``std``. Folder and torchvision datasets only.
        resize (str): how ``image_size`` is reached: ``"crop"`` (default; scale so the image
                    covers the size, keeping its aspect ratio, then centre-crop, as torchvision's
                    presets do) or ``"stretch"`` (resize to exactly ``[h, w]``, distorting
                    non-square images).
    """

    kind: str = "generated"
    root: Optional[str] = None
    name: Optional[str] = None
    factory: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    image_size: Optional[List[int]] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    limit: Optional[int] = None
    preprocess: str = "auto"
    resize: str = "crop"

    def validate(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; choose one of {', '.join(map(repr, DATASET_KINDS))}")
        if self.kind == "folder" and not self.root:
            raise ValueError("dataset kind 'folder' needs root = the folder of images")
        if self.kind == "torchvision" and not self.name:
            raise ValueError("dataset kind 'torchvision' needs name = a torchvision.datasets class, e.g. 'CIFAR10'")
        if self.kind == "factory" and not self.factory:
            raise ValueError("dataset kind 'factory' needs factory = 'package.module:callable' (or 'file.py:callable')")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"dataset kwargs must be a table/dict, got {type(self.kwargs).__name__}")
        self.image_size = _size_pair(self.image_size, "dataset image_size")
        for nm in ("mean", "std"):
            v = getattr(self, nm)
            if v is not None and not (
                isinstance(v, (list, tuple))
                and len(v) > 0
                and all(isinstance(i, (int, float)) and not isinstance(i, bool) and math.isfinite(i) for i in v)
            ):
                raise ValueError(f"dataset {nm} must be a non-empty list of finite numbers (one per channel), got {v!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both dataset mean and std (per-channel normalisation), or neither")
        if self.mean is not None and len(self.mean) != len(self.std):  # type: ignore[arg-type]
            raise ValueError(
                f"dataset mean has {len(self.mean)} values but std has {len(self.std)}; give one value per "  # type: ignore[arg-type]
                "channel in both (3 for RGB images)"
            )
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"dataset preprocess must be one of {', '.join(map(repr, PREPROCESS_MODES))}, got {self.preprocess!r}"
            )
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"dataset resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {self.resize!r}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"dataset std must be positive, got {self.std!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"dataset limit must be a positive int, got {self.limit!r}")


@dataclass
class ModelSpec:
    """Which model to explain.

    Attributes:
        source (str): ``"torchvision"`` (``name`` in ``torchvision.models``, with ``weights``),
                    ``"factory"`` (``factory = "module:callable"`` or ``"file.py:callable"``) or
                    ``"benchmark"`` (``captum_normgrad.models.load_benchmark_model(name)``).
        name (str, optional): model name for torchvision / benchmark.
        factory (str, optional): the callable returning an ``nn.Module``.
        weights (str, optional): torchvision ``weights=`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``; needs
                    the weights in the torch hub cache or network access). Default: random init.
        kwargs (dict): extra keyword arguments for the constructor/factory (``num_classes``...).
        checkpoint (str, optional): a ``state_dict`` file (``torch.save`` or ``.safetensors``)
                    loaded into the model after construction.
    """

    source: str = "torchvision"
    name: Optional[str] = None
    factory: Optional[str] = None
    weights: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None

    def validate(self) -> None:
        if self.source not in MODEL_SOURCES:
            raise ValueError(f"unknown model source {self.source!r}; choose one of {', '.join(map(repr, MODEL_SOURCES))}")
        if self.source in ("torchvision", "benchmark") and not self.name:
            raise ValueError(f"model source {self.source!r} needs name = the model name (e.g. 'resnet18')")
        if self.source == "factory" and not self.factory:
            raise ValueError("model source 'factory' needs factory = 'package.module:callable' (or 'file.py:callable')")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"model kwargs must be a table/dict, got {type(self.kwargs).__name__}")


@dataclass
class MethodSpec:
    """One attribution method.

    Attributes:
        method (str): a built-in name (see :data:`captum_normgrad.runner.methods.BUILTIN_METHODS`) or
                    ``"module:Class"`` for any Captum layer attribution class.
        name (str, optional): the label used in the output keys. Default: ``method``.
        kwargs (dict): keyword arguments for ``attribute`` (e.g. ``virtual_layer``).
        init_kwargs (dict): keyword arguments for the class constructor (e.g. ``loss_fn``-free
                    options of order-1 NormGrad).
        layers (list[str], optional): layers for this method. Default: the run's ``layers``.
    """

    method: str = "normgrad"
    name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init_kwargs: Dict[str, Any] = field(default_factory=dict)
    layers: Optional[List[str]] = None

    def validate(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if self.name is None:
            self.name = self.method.rsplit(":", 1)[-1]
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"method name must be a non-empty string without '/', got {self.name!r}")
        for nm in ("kwargs", "init_kwargs"):
            if not isinstance(getattr(self, nm), dict):
                raise TypeError(f"method {nm} must be a table/dict, got {type(getattr(self, nm)).__name__}")
        if self.layers is not None:
            self.layers = _layer_list(self.layers, f"layers of method {self.name!r}")


@dataclass
class StatisticsSpec:
    """Reference statistics computed in the same pass.

    Attributes:
        parameter_saliency (bool): accumulate the parameter-saliency profiles of
                    :class:`~captum_normgrad.parameter_saliency.ParameterSaliency` (mean
                    ``|dloss/dW_j|`` per conv filter, cross-entropy on the true label) into a
                    Welford state (count, mean, M2), merged across shards and ranks. Written as
                    ``parameter_saliency.pt`` (``ParameterSaliency(model).load(...)`` reads it).
        aggregation (str): ``"filter"`` or ``"parameter"`` (one value per weight: large states).
        parameters (str or list[str], optional): ``"conv"``, ``"all"`` or parameter names
                    (``ParameterSaliency``'s ``parameters``). Default: its default.
    """

    parameter_saliency: bool = False
    aggregation: str = "filter"
    parameters: Optional[Union[str, List[str]]] = None

    def validate(self) -> None:
        if not isinstance(self.parameter_saliency, bool):
            raise TypeError(f"statistics parameter_saliency must be true/false, got {self.parameter_saliency!r}")
        if self.aggregation not in ("filter", "parameter"):
            raise ValueError(f"statistics aggregation must be 'filter' or 'parameter', got {self.aggregation!r}")
        if self.parameters is not None and not (
            isinstance(self.parameters, str)
            or (isinstance(self.parameters, list) and all(isinstance(p, str) for p in self.parameters))
        ):
            raise ValueError(f"statistics parameters must be 'conv', 'all' or a list of names, got {self.parameters!r}")


def _layer_list(v: Any, what: str) -> List[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        raise ValueError(f"{what} must be a list of module names (as in model.named_modules()), got {v!r}")
    return list(v)


# Fields that do not change what is computed: excluded from the configuration hash.
RUNTIME_FIELDS = (
    "output", "device", "num_workers", "threads", "progress", "timeout_s", "verify", "fingerprint", "on_change"
)


@dataclass
class RunConfig:
    """A dataset-scale attribution run.

    Attributes:
        output (str): output directory (created; refused if it holds another configuration).
        dataset (DatasetSpec): the samples.
        model (ModelSpec): the model (put in eval mode).
        methods (list[MethodSpec]): the attribution methods (may be empty for a statistics-only run).
        layers (list[str]): default layers for every method (names from ``model.named_modules()``).
        batch_size (int): samples per forward/backward pass. Default: 16
        shard_size (int): samples per output shard (the unit of resumption). Default: 256
        target (str or int): ``"label"`` (the dataset's label), ``"prediction"`` (the model's
                    argmax) or a fixed class index. Default: ``"label"``
        map_dtype (str): dtype of the stored maps. Default: ``"float32"``
        statistics (StatisticsSpec): reference statistics computed in the same pass.
        device (str): ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cpu"``,
                    ``"cuda"``. Not hashed.
        num_workers (int): DataLoader workers per process. Not hashed. Default: 0
        threads (int, optional): ``torch.set_num_threads`` per process. Not hashed.
        progress (bool): progress bar per rank. Not hashed. Default: True
        timeout_s (float): collective timeout of the process group. Not hashed. Default: 1800
        verify (str): how completed shards are checked on resume: ``"checksum"`` (sha256 of the
                    file against the completion marker) or ``"size"``. Not hashed.
        fingerprint (str): how the image files behind each shard are fingerprinted to detect a
                    change on resume: ``"stat"`` (size + modification time: one ``stat`` per image,
                    free) or ``"content"`` (sha256 of every image file: reads every image file once
                    more per run, on top of decoding it; a touched or copied file with the same
                    bytes then counts as unchanged). The checkpoint is always content-hashed. Not
                    hashed. Default: ``"stat"``
        on_change (str): what a resume does when the checkpoint, the model/dataset factory file
                    or images changed since they were computed: ``"error"`` (refuse, naming what
                    changed) or ``"recompute"`` (recompute what depends on it: every shard for a
                    model change, the affected shards for image changes). Not hashed.
                    Default: ``"error"``
        base_dir (str): folder against which relative paths are resolved (the config file's
                    folder when loaded from a file). Not hashed.
    """

    output: str = "runner_out"
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    methods: List[MethodSpec] = field(default_factory=lambda: [MethodSpec()])
    layers: List[str] = field(default_factory=list)
    batch_size: int = 16
    shard_size: int = 256
    target: Union[str, int] = "label"
    map_dtype: str = "float32"
    statistics: StatisticsSpec = field(default_factory=StatisticsSpec)
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None
    progress: bool = True
    timeout_s: float = 1800.0
    verify: str = "checksum"
    fingerprint: str = "stat"
    on_change: str = "error"
    base_dir: str = "."

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Union[str, Path, None] = None) -> "RunConfig":
        """Build and validate a configuration from a plain dict (the parsed TOML/JSON)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a run configuration must be a table/dict, got {type(data).__name__}")
        data = dict(data)
        _check_keys("top level", data, cls)
        kw: Dict[str, Any] = {}
        for key, value in data.items():
            if key == "dataset":
                kw[key] = _sub(DatasetSpec, value, "dataset")
            elif key == "model":
                kw[key] = _sub(ModelSpec, value, "model")
            elif key == "statistics":
                kw[key] = _sub(StatisticsSpec, value, "statistics")
            elif key == "methods":
                if isinstance(value, (str, Mapping)):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise TypeError(f"methods must be a list of method names or tables, got {type(value).__name__}")
                kw[key] = [
                    MethodSpec(method=m) if isinstance(m, str) else _sub(MethodSpec, m, "methods") for m in value
                ]
            else:
                kw[key] = value
        if base_dir is not None:
            kw["base_dir"] = str(base_dir)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> "RunConfig":
        """Check every field; raise ``ValueError``/``TypeError`` naming the field and the fix."""
        for nm, spec_cls in (("dataset", DatasetSpec), ("model", ModelSpec), ("statistics", StatisticsSpec)):
            v = getattr(self, nm)
            if isinstance(v, Mapping):
                v = _sub(spec_cls, v, nm)
                setattr(self, nm, v)
            if not isinstance(v, spec_cls):
                raise TypeError(f"{nm} must be a {spec_cls.__name__} or a dict, got {type(v).__name__}")
            v.validate()
        if not isinstance(self.output, (str, Path)) or not str(self.output):
            raise ValueError("output must be the path of the output directory")
        self.output = str(self.output)
        self.methods = [MethodSpec(method=m) if isinstance(m, str) else m for m in self.methods]
        self.methods = [_sub(MethodSpec, m, "methods") if isinstance(m, Mapping) else m for m in self.methods]
        names = []
        for m in self.methods:
            if not isinstance(m, MethodSpec):
                raise TypeError(f"methods must hold MethodSpec, dicts or names, got {type(m).__name__}")
            m.validate()
            names.append(m.name)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method name(s) {dup} used twice; give each method entry a distinct name = '...'")
        self.layers = _layer_list(self.layers, "layers") if self.layers else []
        for m in self.methods:
            if not (m.layers or self.layers):
                raise ValueError(
                    f"method {m.name!r} has no layers; set layers = ['layer2', ...] at the top level or in the method"
                )
        if not self.methods and not self.statistics.parameter_saliency:
            raise ValueError("nothing to compute: give at least one method, or statistics.parameter_saliency = true")
        for nm in ("batch_size", "shard_size"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if isinstance(self.target, bool) or not (
            (isinstance(self.target, int) and self.target >= 0) or self.target in TARGET_MODES
        ):
            raise ValueError(f"target must be 'label', 'prediction' or a class index >= 0, got {self.target!r}")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"unknown map_dtype {self.map_dtype!r}; choose one of {', '.join(map(repr, MAP_DTYPES))}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or omitted, got {self.threads!r}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be true/false, got {self.progress!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if self.verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {self.verify!r}")
        if self.fingerprint not in FINGERPRINT_MODES:
            raise ValueError(
                f"fingerprint must be 'stat' (size + mtime, free) or 'content' (sha256 of each image), got {self.fingerprint!r}"
            )
        if self.on_change not in ON_CHANGE_MODES:
            raise ValueError(f"on_change must be 'error' or 'recompute', got {self.on_change!r}")
        return self

    # -- views ---------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    def hashed_dict(self) -> Dict[str, Any]:
        """The fields that decide what is computed (the input of :func:`config_hash`)."""
        d = self.to_dict()
        for k in RUNTIME_FIELDS + ("base_dir",):
            d.pop(k, None)
        return d

    def resolve_path(self, p: Union[str, Path]) -> Path:
        """``p`` relative to :attr:`base_dir` (absolute paths unchanged, ``~`` expanded)."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    @property
    def output_dir(self) -> Path:
        return self.resolve_path(self.output)

    @property
    def hash(self) -> str:
        return config_hash(self)


def _sub(cls: type, value: Any, section: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"[{section}] must be a table/dict, got {type(value).__name__}")
    _check_keys(section, value, cls)
    return cls(**dict(value))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(cfg: RunConfig, extra: Optional[Mapping[str, Any]] = None) -> str:
    """sha256 (hex, 16 chars) of the canonical JSON of the hashed fields (plus ``extra``)."""
    payload: Dict[str, Any] = {"config": cfg.hashed_dict(), "format": 1}
    if extra:
        payload["extra"] = dict(extra)
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted names of the fields whose values differ between two (nested) dicts."""
    out: List[str] = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        name = f"{prefix}{k}"
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out.extend(diff_configs(va, vb, name + "."))
        elif _canonical(va) != _canonical(vb):
            out.append(name)
    return out


def load_config(path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Read a run configuration from a ``.toml`` (Python >= 3.11, ``tomllib``) or ``.json`` file.

    Relative paths inside the file (dataset root, output, checkpoint, ``file.py:callable``
    factories) are resolved against the file's folder.

    Args:
        path (str or Path): the configuration file.
        overrides (dict, optional): top-level keys replacing those of the file (e.g.
                    ``{"output": "elsewhere"}``).
                    Default: None

    Returns:
        *RunConfig*: the validated configuration.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"run configuration {str(p)!r} not found; give the path of a .toml or .json file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix == ".toml":
        if sys.version_info < (3, 11):  # pragma: no cover - py3.10
            raise ValueError("TOML configurations need Python >= 3.11 (tomllib); use a .json configuration instead")
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: invalid TOML: {e}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON: {e}") from None
    else:
        raise ValueError(f"run configuration {str(p)!r} must end in .toml or .json (got {suffix or 'no suffix'!r})")
    if overrides:
        data = {**data, **dict(overrides)}
    return RunConfig.from_dict(data, base_dir=p.resolve().parent)
