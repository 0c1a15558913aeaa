"""From names in a configuration to objects: datasets, models, layers, methods, profiles.

Every resolver raises ``ValueError``/``TypeError`` naming what was not found and how to fix it.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._layers import get_layers
from ..io import IMAGE_EXTENSIONS, import_callable, load_image, load_model, load_state_dict_file, load_weights_into
from ..registry import METHODS, MethodEntry, method_from_spec
from .config import DatasetSpec, MethodSpec, ModelSpec, RunConfig

__all__ = [
    "import_callable",
    "resolve_dataset",
    "resolve_model",
    "resolve_layers",
    "BUILTIN_METHODS",
    "MethodRunner",
    "build_methods",
    "ImageFolderDataset",
    "SampleView",
]



# ---------------------------------------------------------------------------------------------
# callables
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def _image_transform(spec: DatasetSpec) -> Callable[[Any], Tensor]:
    from torchvision import transforms as T

    steps: List[Any] = []
    if spec.image_size is not None:
        steps.append(T.Resize(tuple(spec.image_size)))
    steps.append(T.ToTensor())
    if spec.mean is not None:
        steps.append(T.Normalize(spec.mean, spec.std))
    return T.Compose(steps)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root``: class sub-folders (labels = sorted folder index) or a flat folder (no labels).

    Files are found recursively by extension and sorted; a file that cannot be decoded raises on
    access (the runner reports and skips it). ``sample_id(i)`` is the path relative to ``root``.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable[[Any], Tensor]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"dataset root {str(self.root)!r} is not a folder of images")
        self.transform = transform
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        loose = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        self.classes: List[str] = []
        self.samples: List[Tuple[Path, int]] = []
        if subdirs and not loose:
            self.classes = [d.name for d in subdirs]
            for c, d in enumerate(subdirs):
                for p in sorted(d.rglob("*")):
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                        self.samples.append((p, c))
        else:
            for p in sorted(self.root.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((p, -1))
        if not self.samples:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}; "
                "point dataset root at a folder of images or of class sub-folders"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def sample_id(self, i: int) -> str:
        return self.samples[i][0].relative_to(self.root).as_posix()

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        import numpy as np

        path, label = self.samples[i]
        im = load_image(path)  # every PIL mode read faithfully (16-bit, palette, alpha, ...) or refused
        x = self.transform(im) if self.transform is not None else torch.from_numpy(
            np.asarray(im).copy()
        ).permute(2, 0, 1).float() / 255.0
        return x, label


GENERATED_DATASETS = {
    "shapes": "ShapesDataset",
    "two_object": "TwoObjectShapesDataset",
}


def _generated_dataset(spec: DatasetSpec) -> Any:
    """The package's generated dataset: ``name = "shapes"`` (default) or ``"two_object"``.

    ``kwargs`` go to the class (``num_images`` is required; ``split`` or ``seed``, ``image_size``).
    Items are ``(image, label, mask)``; for two-object images the label used is the first
    object's class.
    """
    from captum_normgrad import datasets as ds_mod

    name = spec.name or "shapes"
    if name not in GENERATED_DATASETS:
        raise ValueError(
            f"unknown generated dataset {name!r}; choose one of {', '.join(map(repr, GENERATED_DATASETS))}"
        )
    kwargs = dict(spec.kwargs)
    if "num_images" not in kwargs:
        raise ValueError("the generated dataset needs kwargs.num_images = how many images to generate")
    return getattr(ds_mod, GENERATED_DATASETS[name])(**kwargs)


def _warn_unnormalised(cfg: RunConfig) -> None:
    """Warn when image files go unnormalised into a torchvision model (which expects its weights'
    normalisation): maps of a model fed inputs it was not trained on are silently off."""
    import warnings

    spec = cfg.dataset
    if spec.kind not in ("folder", "torchvision") or spec.mean is not None or cfg.model.source != "torchvision":
        return
    mean, std = "[0.485, 0.456, 0.406]", "[0.229, 0.224, 0.225]"
    hint = ""
    try:
        from torchvision.models import get_model_weights

        t = get_model_weights(cfg.model.name or "").DEFAULT.transforms()
        mean, std = str([round(v, 3) for v in t.mean]), str([round(v, 3) for v in t.std])
        hint = f" and image_size = [{t.crop_size[0]}, {t.crop_size[0]}]" if spec.image_size is None else ""
    except (ValueError, KeyError, AttributeError):
        pass
    warnings.warn(
        f"dataset ({spec.kind}) applies no normalisation, but the torchvision model {cfg.model.name!r} expects "
        f"its weights' preprocessing: set dataset.mean = {mean}, dataset.std = {std}{hint}",
        UserWarning,
        stacklevel=2,
    )


def resolve_dataset(cfg: RunConfig) -> Any:
    """The map-style dataset of ``cfg.dataset`` (before ``limit`` is applied)."""
    spec = cfg.dataset
    _warn_unnormalised(cfg)
    if spec.kind == "folder":
        return ImageFolderDataset(cfg.resolve_path(spec.root or "."), transform=_image_transform(spec))
    if spec.kind == "torchvision":
        import torchvision

        cls = getattr(torchvision.datasets, spec.name or "", None)
        if cls is None or not inspect.isclass(cls):
            raise ValueError(
                f"torchvision.datasets has no dataset class {spec.name!r}; e.g. 'CIFAR10', 'ImageNet', 'FakeData'"
            )
        kwargs = dict(spec.kwargs)
        if "root" in inspect.signature(cls).parameters and spec.root is not None:
            kwargs.setdefault("root", str(cfg.resolve_path(spec.root)))
        kwargs.setdefault("transform", _image_transform(spec))
        try:
            return cls(**kwargs)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"could not open torchvision dataset {spec.name} ({e}); check root (and download=true if allowed)"
            ) from e
    if spec.kind == "generated":
        return _generated_dataset(spec)
    fn = import_callable(spec.factory or "", cfg.base_dir)
    return fn(**spec.kwargs)


def dataset_length(ds: Any) -> int:
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(
            f"the dataset ({type(ds).__name__}) has no len(); the runner needs a map-style dataset "
            "(__len__ and __getitem__) to shard it"
        ) from None
    return int(n)


@dataclass
class SampleView:
    """One sample as the runner sees it."""

    index: int
    id: str
    ok: bool
    input: Optional[Tensor] = None
    label: int = -1
    error: str = ""


def _unpack(item: Any) -> Tuple[Tensor, int]:
    label: Any = -1
    if isinstance(item, dict):
        x = next((item[k] for k in ("image", "input", "x", "img") if k in item), None)
        label = next((item[k] for k in ("label", "target", "y") if k in item), -1)
    elif isinstance(item, (tuple, list)):
        x = item[0]
        if len(item) > 1:
            label = item[1]
    else:
        x = item
    if x is None:
        raise TypeError("dataset item has no image (expected (image, label), a dict with 'image', or a tensor)")
    if not isinstance(x, Tensor):
        try:
            import numpy as np

            x = torch.as_tensor(np.asarray(x))
        except Exception:
            raise TypeError(f"dataset item image is a {type(x).__name__}, expected a tensor; add a transform") from None
    if isinstance(label, Tensor):
        label = int(label.reshape(-1)[0]) if label.numel() else -1
    elif label is None:
        label = -1
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = -1
    return x, label


class SafeDataset(torch.utils.data.Dataset):
    """Wrap a dataset so that a sample that raises becomes a failed :class:`SampleView`."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return dataset_length(self.ds)

    def sample_id(self, i: int) -> str:
        fn = getattr(self.ds, "sample_id", None)
        if callable(fn):
            try:
                return str(fn(i))
            except Exception:
                pass
        return str(i)

    def __getitem__(self, i: int) -> SampleView:
        sid = self.sample_id(i)
        try:
            x, label = _unpack(self.ds[i])
        except Exception as e:  # unreadable sample: reported, not fatal
            return SampleView(int(i), sid, False, error=f"{type(e).__name__}: {e}")
        return SampleView(int(i), sid, True, x, label)


def collate_views(batch: List[SampleView]) -> List[SampleView]:
    return batch


# ---------------------------------------------------------------------------------------------
# models and layers
# ---------------------------------------------------------------------------------------------
def resolve_model(cfg: RunConfig) -> nn.Module:
    """The model of ``cfg.model`` in eval mode (on the CPU; the runner moves it)."""
    spec: ModelSpec = cfg.model
    if spec.source == "torchvision":
        weights = spec.weights
        if weights is not None and weights.lower() in ("none", "random"):
            weights = None
        model = load_model(spec.name or "", weights=weights, model_kwargs=spec.kwargs, base_dir=cfg.base_dir).model
    elif spec.source == "benchmark":
        from captum_normgrad.models import load_benchmark_model

        # weights: omitted -> the committed trained weights; "none"/"random" -> random init; else a file
        w: Optional[str] = "default" if spec.weights is None else spec.weights
        if w is not None and w.lower() in ("none", "random"):
            w = None
        elif w is not None and w != "default":
            w = str(cfg.resolve_path(w))
        model = load_benchmark_model(spec.name, weights=w, **spec.kwargs)
    else:
        if ":" not in (spec.factory or ""):
            raise ValueError(
                f"model.factory {spec.factory!r} must be 'package.module:callable' or 'path/to/file.py:callable'"
            )
        model = load_model(spec.factory or "", model_kwargs=spec.kwargs, base_dir=cfg.base_dir).model
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model factory returned a {type(model).__name__}, expected a torch.nn.Module")
    if spec.checkpoint:
        path = cfg.resolve_path(spec.checkpoint)
        if not path.is_file():
            raise ValueError(f"model checkpoint {str(path)!r} not found")
        load_weights_into(model, load_state_dict_file(path), str(path), spec.name or spec.factory or "the model")
    return model.eval()


def resolve_layers(model: nn.Module, names: Sequence[str]) -> List[nn.Module]:
    """Modules by their ``named_modules()`` names (``blockN`` aliases for the benchmark models):
    :func:`captum_normgrad._layers.get_layers`."""
    return get_layers(model, names)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and state (names, dtypes, shapes, values)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
#: The registry's methods (:data:`captum_normgrad.registry.METHODS`): the runner defines none of its own.
BUILTIN_METHODS: Mapping[str, MethodEntry] = METHODS


class MethodRunner:
    """One configured attribution method over its layers: ``maps(x, target) -> {key: (N, ...)}``.

    ``spec.method`` is a name of :mod:`captum_normgrad.registry` (its meaning is defined there
    only) or ``"package.module:Class"`` for any Captum layer attribution class.
    """

    def __init__(self, spec: MethodSpec, model: nn.Module, layer_names: Sequence[str], base_dir: str = ".") -> None:
        self.spec = spec
        self.name = str(spec.name)
        self.layer_names = list(layer_names)
        try:
            entry = method_from_spec(spec.method)
        except ValueError as e:
            raise ValueError(f"{e} (or give 'package.module:Class' for any Captum layer attribution)") from None
        # a user's class is imported like a factory (relative files from the config's folder)
        cls = import_callable(spec.method, base_dir) if spec.method not in METHODS and ":" in spec.method else None
        layers = resolve_layers(model, self.layer_names)
        self._bound = entry.build(model, layers, spec.init_kwargs, cls=cls)
        self.entry = entry
        self.multi = entry.multi_layer
        self.kwargs = dict(spec.kwargs)

    def maps(self, x: Tensor, target: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, r in zip(self.layer_names, self._bound.attribute(x, target=target, **self.kwargs)):
            if isinstance(r, Tensor):
                out[f"maps/{self.name}/{name}"] = r
            else:
                for i, t in enumerate(r):
                    out[f"maps/{self.name}/{name}/{i}"] = t
        return out


def build_methods(cfg: RunConfig, model: nn.Module) -> List[MethodRunner]:
    return [MethodRunner(m, model, m.layers or cfg.layers, cfg.base_dir) for m in cfg.methods]
