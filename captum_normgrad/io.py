r"""Files in and out for the command line: images, models, weights, layers and saved maps.

This module belongs to the *faces* floor of the package: it is the
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
import io
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._layers import layer_names

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
    "write_file_atomic",
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
    return _unique_names(items)


def _unique_names(items: List[ImageItem]) -> List[ImageItem]:
    """Give every image its own output stem: the first of equal names keeps it, later ones get
    ``-2``, ``-3``, ... skipping any name another image has (``a.png``, ``a.jpg``, ``a-2.png``
    -> ``a``, ``a-3``, ``a-2``). Names are compared case-insensitively (``A.png`` and ``a.png``
    are one file name on macOS and Windows)."""
    natural = {it.name.casefold() for it in items}
    used: set = set()
    unique: List[ImageItem] = []
    for it in items:
        name = it.name
        if name.casefold() in used:
            k = 2
            while f"{name}-{k}".casefold() in used or f"{name}-{k}".casefold() in natural:
                k += 1
            name = f"{name}-{k}"
        used.add(name.casefold())
        unique.append(ImageItem(it.path, name))
    return unique


def load_image(path: Union[str, Path]) -> "Image.Image":
    r"""Read an image file with PIL as 8-bit RGB, whatever its mode (decoding it fully, now).

    Modes are converted so that the picture is what a viewer shows: 16-bit and 32-bit integer
    images (``I;16``, ``I``) are scaled from their full range (65535 -> 255, not clipped),
    floating-point images (``F``) must lie in ``[0, 1]`` or ``[0, 255]``; palette, CMYK, 1-bit,
    grayscale and YCbCr images are converted by PIL; transparent pixels (``LA``, ``RGBA``, ``PA``
    or a palette with transparency) are composited onto white. Multi-frame files give their
    first frame.

    Raises:
        FileNotFoundError: the file does not exist.
        CLIInputError: the file is not an image PIL can decode, is larger than PIL's
                    decompression-bomb limit, or has a mode that cannot be read faithfully
                    (message names the file and the fix).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such image file: {str(path)!r}")
    try:
        with Image.open(p) as im:
            im.load()
            return _to_rgb8(im, str(path))
    except Image.DecompressionBombError as e:
        raise CLIInputError(
            f"image {str(path)!r} is too large to decode safely ({_first_line(e)}); if you trust it, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (or set it to None) before loading"
        ) from None
    except CLIInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        raise CLIInputError(f"cannot decode image {str(path)!r} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _to_rgb8(im: "Image.Image", name: str) -> "Image.Image":
    """8-bit RGB of any PIL image (see :func:`load_image`)."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            scale = 65535.0
        elif mode == "I":
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if lo < 0 or hi > 65535:
                raise CLIInputError(
                    f"image {name!r} is a 32-bit integer image with values in [{lo:g}, {hi:g}]: only 8- and 16-bit "
                    "ranges are read; convert it to an 8- or 16-bit image"
                )
            # a 16-bit PNG or TIFF opened as 32-bit 'I': its range is 16-bit
            scale = 255.0 if hi <= 255 and im.format not in ("PNG", "TIFF") else 65535.0
        else:  # F
            lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size else (0.0, 0.0)
            if not np.isfinite(arr).all() or lo < 0 or hi > 255:
                raise CLIInputError(
                    f"image {name!r} is a floating-point image with values outside [0, 255] (or NaN): "
                    "save it as an 8- or 16-bit image"
                )
            scale = 1.0 if hi <= 1.0 else 255.0
        gray = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX"):
        return im.convert("RGB")
    raise CLIInputError(
        f"image {name!r} has colour mode {mode!r}, which is not read faithfully here: convert it to RGB "
        "(e.g. PIL's Image.convert) first"
    )


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


def _builder_takes(name: str, arg: str) -> bool:
    """Whether torchvision's builder of model ``name`` (or the class it builds) takes ``arg``."""
    import inspect

    from torchvision.models import get_model_builder

    builder = get_model_builder(name)
    if arg in inspect.signature(builder).parameters:
        return True
    # builders pass **kwargs on to the class (e.g. VisionTransformer(image_size=...))
    import torchvision.models as tvm

    cls_names = {"vit": "VisionTransformer"}
    cls = getattr(tvm, cls_names.get(name.split("_")[0], ""), None)
    return cls is not None and arg in inspect.signature(cls).parameters


def import_callable(spec: str, base_dir: Union[str, Path] = ".") -> Any:
    """``package.module:callable`` or ``path/to/file.py:callable`` -> the callable (``callable`` may be dotted).

    Relative file paths are taken from ``base_dir``; a file is imported once per resolved path and a
    failed import leaves no half-imported module behind. A module name is imported from the
    installed packages first, then from the working folder (appended to the *end* of
    ``sys.path``, so a local folder named like a dependency does not shadow it).

    This imports and runs the user's code: a model spec or a configuration is code, to be trusted
    as such.

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
            # the working folder is searched LAST, after the installed packages: a local folder named
            # like a dependency (e.g. ./torch) must not shadow it
            cwd = str(Path.cwd())
            if "" not in sys.path and cwd not in sys.path:
                sys.path.append(cwd)
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
        # the whole reason, on one line: torch's refusal explains why unpickling was blocked
        import re

        reason = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split()) or type(e).__name__  # no terminal codes
        raise CLIInputError(f"cannot read weights file {str(path)!r} ({reason})") from None
    return _unwrap_state_dict(obj, str(path))


def _short_list(names: Sequence[str], k: int = 4) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def load_weights_into(model: "nn.Module", sd: Mapping[str, "torch.Tensor"], path: str, model_name: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a one-line diagnosis (missing, unexpected and
    mismatched keys, and the fix) when the state dict does not fit the model."""
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
    model_kwargs: Optional[Mapping[str, Any]] = None,
    base_dir: Union[str, Path] = ".",
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
        model_kwargs (dict, optional): more keyword arguments for the builder (the runner's
                    ``model.kwargs``). Default: None
        base_dir (str or Path, optional): folder of relative ``file.py:callable`` and weights
                    paths (the runner's configuration folder). Default: ``"."``

    This is the package's one model loader: ``explain``, ``layers`` and the runner
    (``captum_normgrad.runner``) build models through it. A ``module:callable`` imports and
    runs that code: a model spec is code, to be trusted as such.

    Returns:
        LoadedModel: the model in eval mode and its preprocessing (the weights' own
        ``transforms()``, or the model's default weights' when it has random or file weights,
        or ImageNet's for a ``module:callable`` model).

    Raises:
        CLIInputError / FileNotFoundError: unknown model, bad builder, unknown weights name or
                    missing weights file, weights that cannot be downloaded or do not match the model.
    """
    from torch import nn

    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    if weights is not None and not Path(weights).is_absolute() and (Path(base_dir) / weights).is_file():
        weights = str(Path(base_dir) / weights)
    if num_classes is not None:
        if int(num_classes) < 1:
            raise CLIInputError(f"--num-classes must be at least 1, got {num_classes}")
        kwargs["num_classes"] = int(num_classes)
    tv_weights = None  # a torchvision weights enum member
    weights_path: Optional[str] = None
    categories: Optional[List[str]] = None
    pre_weights = None  # whose transforms() preprocess the images

    if ":" in spec:
        builder = import_callable(spec, base_dir)
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
                model = get_model(spec, weights=tv_weights, **kwargs)
            except Exception as e:  # no network, corrupt cache, ...
                reason = " ".join(str(e).split()) or type(e).__name__
                raise CLIInputError(
                    f"cannot load {spec} weights {tv_weights.name} from torchvision ({reason}); "
                    f"without internet, copy {tv_weights.url.rsplit('/', 1)[-1]} into the torch hub "
                    "cache ($TORCH_HOME/hub/checkpoints) or pass --weights FILE"
                ) from None
            pre_weights = tv_weights
            categories = list(tv_weights.meta["categories"])
        else:
            if image_size is not None and _builder_takes(spec, "image_size"):
                kwargs["image_size"] = int(image_size)  # vision transformers: position embeddings for that size
            try:
                model = get_model(spec, weights=None, **kwargs)
            except (ValueError, AssertionError) as e:
                raise CLIInputError(f"cannot build {spec} with {kwargs or 'its defaults'}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise CLIInputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights_path is not None:
        load_weights_into(model, load_state_dict_file(weights_path), weights_path, spec)
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


def get_layer(model: "nn.Module", name: str) -> "nn.Module":
    r"""The submodule called ``name``: :func:`captum_normgrad._layers.get_layer` with a
    :class:`CLIInputError` (one line, for the command line) for an unknown name.

    Names are dotted as in ``model.named_modules()``; a ``DataParallel`` wrapper is looked
    through; the benchmark models' ``blockN`` aliases work.

    Raises:
        CLIInputError: unknown name; the message lists the valid names (all of them up to two
                    levels deep, with a count of the deeper ones) and the closest matches.
    """
    from ._layers import UnknownLayerError
    from ._layers import get_layer as _get_layer

    try:
        return _get_layer(model, name)
    except UnknownLayerError as e:
        raise CLIInputError(str(e)) from None


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
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    write_file_atomic(p, buf.getvalue())
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
        buf = io.BytesIO()
        np.save(buf, t.numpy())
        write_file_atomic(base.with_name(base.name + ".npy"), buf.getvalue())
        out.append(base.with_name(base.name + ".npy"))
    if "pt" in formats:
        buf = io.BytesIO()
        torch.save(t.clone(), buf)
        write_file_atomic(base.with_name(base.name + ".pt"), buf.getvalue())
        out.append(base.with_name(base.name + ".pt"))
    return out


def write_file_atomic(path: Union[str, Path], data: bytes) -> Path:
    r"""Write ``data`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    A symbolic link at ``path`` is replaced by the file, never written through; a reader never
    sees a half-written file. This is the runner's
    :func:`captum_normgrad.runner.storage.atomic_write_bytes`, with a full disk or a read-only
    folder reported as one line naming the file and the fix.

    Raises:
        OSError: the file cannot be written (message names the file, the cause and the fix).
    """
    import errno

    from .runner.storage import atomic_write_bytes

    p = Path(path)
    try:
        atomic_write_bytes(p, data)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            why = "no space left on the device"
            fix = "free some space or choose another output folder"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "permission denied (read-only folder?)"
            fix = "choose an output folder you can write to"
        else:
            why = e.strerror or str(e)
            fix = "check the output folder"
        raise OSError(e.errno, f"cannot write {str(p)!r}: {why}; {fix}") from None
    return p
