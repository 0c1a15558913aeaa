r"""Files in and out for the command line: images, models, weights, layers and saved maps.

This module belongs to the *faces* floor of the package (see the architecture notes): it is the
only library code that reads images and weight files from disk and writes maps and figures. The
attribution methods themselves never touch files.

Everything that can go wrong because of user input (a missing file, an image that does not decode,
an unknown model or layer name, weights that do not fit the model) raises a ``ValueError``,
``FileNotFoundError`` or :class:`CLIInputError` with a one-line message naming the problem and the
fix, so that the command line can print it without a traceback.

Examples::

    >>> items = find_images(["photos/"])                   # every image below photos/
    >>> loaded = load_model("resnet18", weights=None)      # random init, ImageNet preprocessing
    >>> x = loaded.preprocess(load_image(items[0].path))   # (3, 224, 224), normalised
    >>> layer = get_layer(loaded.model, "layer3")
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image
    from torch import nn

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAP_FORMATS",
    "CLIInputError",
    "ImageItem",
    "LoadedModel",
    "find_images",
    "load_image",
    "load_model",
    "load_state_dict_file",
    "layer_names",
    "get_layer",
    "make_preprocess",
    "overlay",
    "save_map",
    "save_overlay",
]

IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)
MAP_FORMATS: Tuple[str, ...] = ("png", "npy", "pt")

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


class CLIInputError(ValueError):
    """A user-input problem with a message meant to be shown as is (one line, no traceback)."""


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageItem:
    """One input image: where it is and the unique stem used for its output files.

    Attributes:
        path (Path): the image file.
        name (str): output stem, unique among the images of a run (the path relative to the
                    folder it was found in, with ``/`` replaced by ``__``).
    """

    path: Path
    name: str


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def find_images(paths: Sequence[Union[str, Path]], recursive: bool = True) -> List[ImageItem]:
    r"""Expand files and folders into a sorted list of images with unique output names.

    Args:
        paths (sequence of str or Path): image files and/or folders. A file is taken whatever its
                    extension (it must decode later); a folder contributes its files whose
                    extension is one of :data:`IMAGE_EXTENSIONS` (case-insensitive).
        recursive (bool, optional): also search sub-folders. Default: True

    Returns:
        list[ImageItem]: files in the order given, each folder's images sorted by path.

    Raises:
        FileNotFoundError: a path does not exist.
        CLIInputError: no path given, or no image found.

    Examples::

        >>> [i.name for i in find_images(["cat.png", "more/"])]
        ['cat', 'a', 'sub__b']
    """
    if len(paths) == 0:
        raise CLIInputError("no image given: pass image files and/or folders")
    items: List[ImageItem] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {str(raw)!r}")
        if p.is_dir():
            found = sorted(q for q in (p.rglob("*") if recursive else p.iterdir()) if _is_image(q))
            if not found:
                raise CLIInputError(
                    f"folder {str(raw)!r} holds no image (looked for {', '.join(IMAGE_EXTENSIONS)}"
                    f"{' in sub-folders too' if recursive else ''})"
                )
            for q in found:
                rel = q.relative_to(p).with_suffix("")
                items.append(ImageItem(q, "__".join(rel.parts)))
        else:
            items.append(ImageItem(p, p.stem))
    # make names unique, keeping the first occurrence as is
    seen: Dict[str, int] = {}
    unique: List[ImageItem] = []
    for it in items:
        n = seen.get(it.name, 0)
        seen[it.name] = n + 1
        unique.append(it if n == 0 else ImageItem(it.path, f"{it.name}-{n + 1}"))
    return unique


def load_image(path: Union[str, Path]) -> "Image.Image":
    r"""Read an image file with PIL and convert it to RGB (decoding it fully, now).

    Raises:
        FileNotFoundError: the file does not exist.
        CLIInputError: the file is not an image PIL can decode (message names the file).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such image file: {str(path)!r}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIInputError(f"cannot decode image {str(path)!r} ({reason})") from None


# --------------------------------------------------------------------------- models and weights


@dataclass
class LoadedModel:
    """A model ready to explain, with what is needed around it.

    Attributes:
        model (nn.Module): the model, in eval mode.
        preprocess (Callable): PIL image -> normalised ``(3, H, W)`` tensor.
        mean (tuple[float, float, float]): normalisation mean (to undo it for display).
        std (tuple[float, float, float]): normalisation standard deviation.
        categories (list[str] or None): class names, when known (torchvision weights).
        description (str): what was loaded, for logs (``"resnet18 (random init)"``).
        pretrained (bool): whether trained weights were loaded.
    """

    model: "nn.Module"
    preprocess: Any
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    categories: Optional[List[str]] = None
    description: str = ""
    pretrained: bool = False

    def to_display(self, x: "torch.Tensor") -> "torch.Tensor":
        """Undo the normalisation of a preprocessed ``(..., 3, H, W)`` tensor: values in ``[0, 1]``."""
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * std + mean).clamp(0, 1)


def make_preprocess(
    weights: Any = None,
    image_size: Optional[int] = None,
    normalize: bool = True,
) -> Tuple[Any, Tuple[float, ...], Tuple[float, ...]]:
    r"""The preprocessing of a torchvision weights entry, optionally at another size.

    Args:
        weights (torchvision WeightsEnum, optional): its ``transforms()`` (an
                    ``ImageClassification``: resize, centre crop, scale to [0, 1], normalise) is
                    used. ImageNet's (resize 256, crop 224) when None. Default: None
        image_size (int, optional): resize the shorter side to this and centre-crop a square of
                    this size instead of the weights' sizes. Default: None
        normalize (bool, optional): apply the mean/std normalisation (off for models trained on
                    [0, 1] inputs). Default: True

    Returns:
        (transform, mean, std): the transform maps a PIL image to a ``(3, H, W)`` float tensor.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    if weights is not None:
        base = weights.transforms()
        crop, resize = list(base.crop_size), list(base.resize_size)
        mean, std = tuple(base.mean), tuple(base.std)
        interpolation = base.interpolation
    else:
        crop, resize = [224], [256]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        interpolation = InterpolationMode.BILINEAR
    if image_size is not None:
        if int(image_size) < 1:
            raise CLIInputError(f"--image-size must be a positive number of pixels, got {image_size}")
        crop = resize = [int(image_size)]
    if not normalize:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    t = ImageClassification(
        crop_size=crop[0], resize_size=resize[0], mean=mean, std=std, interpolation=interpolation
    )
    return t, tuple(mean), tuple(std)


def _torchvision_models() -> List[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def import_callable(spec: str, base_dir: Union[str, Path] = ".") -> Any:
    """``package.module:callable`` or ``path/to/file.py:callable`` -> the callable (``callable`` may be dotted).

    Relative file paths are taken from ``base_dir``; a file is imported once per resolved path and a
    failed import leaves no half-imported module behind.

    Raises:
        CLIInputError: not of that form, module or attribute missing, or not callable.
        FileNotFoundError: the ``.py`` file does not exist.
    """
    if not isinstance(spec, str):
        raise CLIInputError(f"expected 'package.module:callable' or 'path/to/file.py:callable', got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise CLIInputError(f"model {spec!r} is not of the form module:callable or file.py:callable")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
            path = Path(mod_name).expanduser()
            if not path.is_absolute():
                path = Path(base_dir) / path
            if not path.is_file():
                raise FileNotFoundError(f"no such model file: {str(path)!r}")
            module_key = "_captum_normgrad_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(module_key)
            if module is None:
                spec_obj = importlib.util.spec_from_file_location(module_key, path)
                if spec_obj is None or spec_obj.loader is None:  # pragma: no cover - defensive
                    raise CLIInputError(f"cannot import {mod_name!r}")
                module = importlib.util.module_from_spec(spec_obj)
                sys.modules[module_key] = module
                try:
                    spec_obj.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(module_key, None)  # no half-imported module left behind
                    raise
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the user's own modules
            module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise CLIInputError(f"cannot import module {mod_name!r} for model {spec!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIInputError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIInputError(f"{spec!r} is not callable: give a function or class that returns an nn.Module")
    return obj


def _unwrap_state_dict(obj: Any, path: str) -> Dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIInputError(
            f"weights file {path!r} does not hold a state dict (name -> tensor); save one with "
            "torch.save(model.state_dict(), path) or safetensors"
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, "torch.Tensor"]:
    r"""Read a state dict from a ``.safetensors`` file or a ``torch.save`` file (``.pt``/``.pth``).

    Checkpoints that wrap the state dict under ``"state_dict"``, ``"model_state_dict"`` or
    ``"model"`` are unwrapped, and a ``module.`` prefix (DataParallel) is removed. Files are read
    with ``weights_only=True``: no pickled code is executed.

    Raises:
        FileNotFoundError: no such file.
        CLIInputError: the file is not a readable state dict.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {str(path)!r}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIInputError(f"cannot read weights file {str(path)!r} ({reason[:200]})") from None
    return _unwrap_state_dict(obj, str(path))


def _short_list(names: Sequence[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _load_weights_into(model: "nn.Module", sd: Mapping[str, "torch.Tensor"], path: str, model_name: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line diagnosis when the file does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatch(es), e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
        hint = "check --model"
        out_keys = [k for k in mismatched if k.endswith("weight") and own[k].dim() == 2]
        if out_keys:
            hint = f"check --model, or pass --num-classes {sd[out_keys[-1]].shape[0]} if the classifier was retrained"
        raise CLIInputError(f"weights {path!r} do not match model {model_name}: {'; '.join(parts)} ({hint})")
    model.load_state_dict(sd, strict=True)


def load_model(
    spec: str,
    weights: Optional[str] = None,
    num_classes: Optional[int] = None,
    image_size: Optional[int] = None,
    normalize: bool = True,
) -> LoadedModel:
    r"""Build a classification model by name, with weights and the matching preprocessing.

    Args:
        spec (str): a torchvision classification model name (``"resnet50"``, ``"vgg16"``, ...; see
                    ``torchvision.models.list_models(module=torchvision.models)``), or a user's
                    builder as ``package.module:callable`` or ``path/to/file.py:callable`` (called
                    with no argument, or with ``num_classes=`` when given).
        weights (str, optional): ``None`` for random initialisation; ``"DEFAULT"`` or a member
                    name of the model's torchvision weights enum (e.g. ``"IMAGENET1K_V2"``), which
                    torchvision downloads once into its cache; or a path to a state dict
                    (``.pt``, ``.pth``, ``.safetensors``). Default: None
        num_classes (int, optional): number of outputs of the classifier (for a retrained head).
                    Default: None (the model's default)
        image_size (int, optional): input size, overriding the weights' preprocessing sizes.
                    Default: None
        normalize (bool, optional): apply the mean/std normalisation. Default: True

    Returns:
        LoadedModel: the model in eval mode and its preprocessing (the weights' own
        ``transforms()``, or the model's default weights' when it has random or file weights,
        or ImageNet's for a ``module:callable`` model).

    Raises:
        CLIInputError / FileNotFoundError: unknown model, bad builder, unknown weights name or
                    missing weights file, weights that cannot be downloaded or do not match the model.
    """
    from torch import nn

    kwargs: Dict[str, Any] = {}
    if num_classes is not None:
        if int(num_classes) < 1:
            raise CLIInputError(f"--num-classes must be at least 1, got {num_classes}")
        kwargs["num_classes"] = int(num_classes)
    tv_weights = None  # a torchvision weights enum member
    weights_path: Optional[str] = None
    categories: Optional[List[str]] = None
    pre_weights = None  # whose transforms() preprocess the images

    if ":" in spec:
        builder = import_callable(spec)
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(
                    f"no such weights file: {weights!r} (named torchvision weights need a torchvision model name)"
                )
            weights_path = weights
        try:
            model = builder(**kwargs)
        except TypeError as e:
            raise CLIInputError(f"calling {spec} failed: {e}") from None
    else:
        from torchvision.models import get_model, get_model_weights

        available = _torchvision_models()
        if spec not in available:
            close = difflib.get_close_matches(spec, available, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CLIInputError(
                f"unknown model {spec!r}: {hint}give a torchvision classification model name "
                f"(e.g. resnet50, vgg16, vit_b_16; {len(available)} in all) or module:callable"
            )
        enum = get_model_weights(spec)
        pre_weights = enum.DEFAULT
        if weights is not None:
            key = weights.split(".")[-1]  # accept ResNet50_Weights.IMAGENET1K_V2 too
            if key in enum.__members__:
                tv_weights = enum[key]
            elif Path(weights).is_file():
                weights_path = weights
            else:
                raise CLIInputError(
                    f"--weights {weights!r} is neither a weights name of {spec} "
                    f"({', '.join(enum.__members__)}) nor an existing state-dict file"
                )
        if tv_weights is not None:
            n_cat = len(tv_weights.meta["categories"])
            if kwargs.get("num_classes", n_cat) != n_cat:
                raise CLIInputError(
                    f"--num-classes {kwargs['num_classes']} does not match weights {tv_weights.name} ({n_cat} classes)"
                )
            try:
                model = get_model(spec, weights=tv_weights)
            except Exception as e:  # no network, corrupt cache, ...
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CLIInputError(
                    f"cannot load {spec} weights {tv_weights.name} from torchvision ({reason[:160]}); "
                    f"without internet, copy {tv_weights.url.rsplit('/', 1)[-1]} into the torch hub "
                    "cache ($TORCH_HOME/hub/checkpoints) or pass --weights FILE"
                ) from None
            pre_weights = tv_weights
            categories = list(tv_weights.meta["categories"])
        else:
            model = get_model(spec, weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise CLIInputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights_path is not None:
        _load_weights_into(model, load_state_dict_file(weights_path), weights_path, spec)
    transform, mean, std = make_preprocess(pre_weights, image_size, normalize)
    if tv_weights is not None:
        desc = f"{spec} (torchvision weights {tv_weights.name})"
    elif weights_path is not None:
        desc = f"{spec} (weights {weights_path})"
    else:
        desc = f"{spec} (random init)"
    return LoadedModel(
        model.eval(), transform, mean, std, categories, desc, pretrained=tv_weights is not None or weights_path is not None
    )


# --------------------------------------------------------------------------- layers


def layer_names(model: "nn.Module") -> List[str]:
    """Every submodule's dotted name, in ``named_modules()`` order (the root excluded)."""
    return [n for n, _ in model.named_modules() if n]


def get_layer(model: "nn.Module", name: str) -> "nn.Module":
    r"""The submodule called ``name`` (dotted, as in ``model.named_modules()``).

    Raises:
        CLIInputError: unknown name; the message lists the valid names (all of them up to two
                    levels deep, with a count of the deeper ones) and the closest matches.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(model)
    close = difflib.get_close_matches(name, names, n=3)
    shallow = [n for n in names if n.count(".") <= 1]
    deeper = len(names) - len(shallow)
    msg = f"unknown layer {name!r}"
    if close:
        msg += f" (did you mean {', '.join(close)}?)"
    msg += f"; valid names: {', '.join(shallow)}"
    if deeper:
        msg += f" (and {deeper} deeper names: `captum-normgrad layers` lists them all)"
    raise CLIInputError(msg)


# --------------------------------------------------------------------------- saving


def overlay(image: "torch.Tensor", heat: "torch.Tensor", alpha: float = 0.5, cmap: str = "jet") -> "torch.Tensor":
    r"""Blend a heat map over an image.

    Args:
        image (Tensor): ``(3, H, W)`` in ``[0, 1]``.
        heat (Tensor): ``(h, w)`` map at any resolution; upsampled (bilinear) to ``H x W`` and
                    min-max normalised (a constant map shows as uniform).
        alpha (float, optional): weight of the heat map. Default: 0.5
        cmap (str, optional): matplotlib colormap name. Default: ``"jet"``

    Returns:
        Tensor: ``(3, H, W)`` in ``[0, 1]``.
    """
    import torch
    import torch.nn.functional as F
    from matplotlib import colormaps

    from ._maps import normalize_maps

    h = heat.detach().float().cpu()
    if h.dim() != 2:
        raise ValueError(f"heat map must be 2-D (h, w), got shape {tuple(heat.shape)}")
    h = F.interpolate(h[None, None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    h = normalize_maps(h, constant_value=0.0)[0, 0]
    rgb = torch.from_numpy(colormaps[cmap](h.numpy())[..., :3]).permute(2, 0, 1).float()
    return ((1 - alpha) * image.detach().float().cpu() + alpha * rgb).clamp(0, 1)


def save_overlay(path: Union[str, Path], image: "torch.Tensor", heat: "torch.Tensor", alpha: float = 0.5) -> Path:
    """Write :func:`overlay` of ``heat`` on ``image`` as a PNG; returns the path."""
    from PIL import Image

    arr = (overlay(image, heat, alpha) * 255).round().byte().permute(1, 2, 0).numpy()
    p = Path(path)
    Image.fromarray(arr).save(p, format="PNG")
    return p


def save_map(stem: Union[str, Path], heat: "torch.Tensor", formats: Sequence[str] = ("npy",)) -> List[Path]:
    r"""Write a raw (unnormalised) map as ``stem.npy`` (numpy) and/or ``stem.pt`` (torch).

    Args:
        stem (str or Path): output path without extension.
        heat (Tensor): the map, any shape; saved as float32 on the CPU.
        formats (sequence of str, optional): among ``"npy"`` and ``"pt"``; others are ignored
                    (``"png"`` is written by :func:`save_overlay`). Default: ``("npy",)``

    Returns:
        list[Path]: the files written.
    """
    import numpy as np
    import torch

    t = heat.detach().to("cpu", torch.float32).contiguous()
    out: List[Path] = []
    base = Path(stem)
    if "npy" in formats:
        np.save(base.with_name(base.name + ".npy"), t.numpy())
        out.append(base.with_name(base.name + ".npy"))
    if "pt" in formats:
        torch.save(t.clone(), base.with_name(base.name + ".pt"))
        out.append(base.with_name(base.name + ".pt"))
    return out
