r"""Explain image files with a classification model: the engine behind ``captum-normgrad explain``.

Two parts:

* :func:`compute_maps`: the maps of a method of :mod:`captum_normgrad.registry` (the one place
  where method names get their meaning) at several layers, as ``(N, 1, h, w)`` tensors. It is
  pure computation (no files, no printing).
* :func:`explain_files`, which loads images in batches, computes every method at every layer and
  writes overlaid PNGs and raw ``.npy`` / ``.pt`` maps plus an ``index.json``.

Examples::

    >>> from captum_normgrad.io import find_images, load_model, get_layer
    >>> loaded = load_model("resnet18", image_size=64)
    >>> report = explain_files(find_images(["photos/"]), loaded,
    ...                        {"layer3": get_layer(loaded.model, "layer3")},
    ...                        ["normgrad", "gradcam_relu"], out="explanations")
    >>> report.n_images
    12
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # torch is imported where it is used, so that `captum-normgrad --help` stays fast
    import torch
    from torch import Tensor, nn

from .io import CLIInputError, ImageItem, LoadedModel, load_image, save_map, save_overlay
from .registry import METHODS as REGISTRY_METHODS
from .registry import MethodEntry, get_method

__all__ = ["MethodSpec", "METHODS", "method_names", "explain_method_names", "compute_maps", "resolve_device", "ExplainReport", "explain_files"]

#: The registry's methods (:data:`captum_normgrad.registry.METHODS`): ``explain`` defines none of its own.
METHODS: Dict[str, MethodEntry] = REGISTRY_METHODS
#: Deprecated name of :class:`captum_normgrad.registry.MethodEntry` (kept one release).
MethodSpec = MethodEntry


def method_names() -> List[str]:
    """The names ``explain`` accepts, in registry order (one-channel maps; see :func:`compute_maps`)."""
    return [n for n, e in METHODS.items() if not e.per_channel]


def _explain_entry(method: str) -> MethodEntry:
    """The registry entry of ``method`` if ``explain`` can write its maps (one channel per location)."""
    try:
        entry = get_method(method)
    except ValueError as e:
        raise CLIInputError(str(e)) from None
    if entry.per_channel:
        summed = [n for n in METHODS if n.startswith(entry.name + "_") and not METHODS[n].per_channel]
        fix = f"use {summed[0]!r}" if summed else "choose a one-channel method"
        raise CLIInputError(
            f"method {entry.name!r} gives one map per channel of the layer ({entry.formula}); explain writes one "
            f"map per layer: {fix}"
        )
    return entry


def explain_method_names(names: Sequence[str], note: Optional[Callable[[str], None]] = None) -> List[str]:
    r"""Validate method names for ``explain`` and map deprecated aliases to registry names.

    Args:
        names (sequence of str): names or deprecated aliases.
        note (callable, optional): called with a one-line text for each deprecated alias (the
                    command line prints it); when None, a :class:`FutureWarning` is issued. Default: None

    Returns:
        list[str]: registry names, in the order given.

    Raises:
        CLIInputError: unknown name, or a method with one map per channel.
    """
    import warnings

    from .registry import ALIASES

    out = []
    for n in names:
        if n in ALIASES and note is not None:
            note(f"method name {n!r} is deprecated: use {ALIASES[n]!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out.append(_explain_entry(n).name)
        else:
            out.append(_explain_entry(n).name)
    return out


LAYOUTS: Tuple[str, ...] = ("auto", "channels_first", "channels_last", "tokens")


def detect_layouts(
    model: nn.Module, layers: Sequence[nn.Module], inputs: Tensor, layouts: Union[str, Sequence[str]] = "auto"
) -> List[Tuple[str, Tuple[int, int]]]:
    r"""The spatial layout of each layer's output: ``(layout, (h, w))``.

    Args:
        model (nn.Module): the model (one forward pass on ``inputs[:1]``, no gradient; not modified).
        layers (sequence of nn.Module): layers of ``model``.
        inputs (Tensor): ``(N, 3, H, W)`` inputs (only the first is used).
        layouts (str or sequence of str, optional): ``"auto"`` (guessed from the output shape by
                    :func:`captum_normgrad._layers.layout_of`), or for each layer (or all)
                    ``"channels_first"`` (``(N, C, H, W)``), ``"channels_last"`` (``(N, H, W, C)``,
                    Swin) or ``"tokens"`` (``(N, T, C)``, ViT: ``T = h * w`` tokens, or ``1 + h * w``
                    with a class token first). Default: ``"auto"``

    Returns:
        list[tuple[str, tuple[int, int]]]: per layer, the layout and the grid ``(h, w)``.

    Raises:
        CLIInputError: a layer whose output has no spatial layout, or one that contradicts the given layout.
    """
    import torch

    from ._layers import layout_of

    wanted = [layouts] * len(layers) if isinstance(layouts, str) else list(layouts)
    if len(wanted) != len(layers):
        raise CLIInputError(f"{len(wanted)} layouts for {len(layers)} layers: give one, or one per layer")
    for w in wanted:
        if w not in LAYOUTS:
            raise CLIInputError(f"unknown layout {w!r}: choose among {', '.join(LAYOUTS)}")
    shapes: Dict[int, Tuple[int, ...]] = {}
    handles = [
        layer.register_forward_hook(
            lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape) if isinstance(o, torch.Tensor) else ())
        )
        for k, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    image_hw = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    out = []
    for k, w in enumerate(wanted):
        shape = shapes.get(k)
        if not shape:
            raise CLIInputError(
                f"layer {k + 1} of {len(layers)} was not called by the model, or returns several tensors: "
                "choose a layer with one tensor output"
            )
        guess = layout_of(shape, image_hw)
        if w == "auto":
            if guess is None:
                raise CLIInputError(
                    f"the layer's output {shape} has no spatial layout (not (N, C, H, W), (N, H, W, C) or (N, T, C) "
                    "tokens on a grid): choose a convolutional or encoder block, not the classifier"
                )
            out.append(guess)
            continue
        grid = _grid_for(w, shape, image_hw)
        if grid is None:
            raise CLIInputError(f"layout {w!r} does not fit the layer's output shape {shape}")
        out.append((w, grid))
    return out


def _grid_for(layout: str, shape: Tuple[int, ...], image_hw: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The ``(h, w)`` grid of ``shape`` read with ``layout`` (tokens: the factorisation closest to the image's aspect)."""
    if layout == "channels_first" and len(shape) == 4:
        return (shape[2], shape[3])
    if layout == "channels_last" and len(shape) == 4:
        return (shape[1], shape[2])
    if layout == "tokens" and len(shape) == 3:
        return _token_grid(shape[1], image_hw)
    return None


def _token_grid(t: int, image_hw: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """``(h, w)`` with ``h * w == t`` or ``t - 1`` (class token), closest to the image's aspect ratio;
    None when no such grid has the same patch size along both sides (e.g. several extra tokens)."""
    H, W = image_hw
    best: Optional[Tuple[float, Tuple[int, int]]] = None
    for n in (t - 1, t):  # a class token first is the common case (ViT)
        for h in range(1, n + 1):
            if n % h == 0:
                w = n // h
                err = abs(h / w - H / W)
                if best is None or err < best[0] - 1e-12:
                    best = (err, (h, w))
        if best is not None and best[0] < 1e-9:
            return best[1]
    if best is None:
        return None
    h, w = best[1]
    # the same patch size along both sides (within a pixel), or it is not a patch grid of this image
    return best[1] if abs(H / h - W / w) <= 1.0 else None


def _to_grid(m: Tensor, layout: str, grid: Tuple[int, int]) -> Tensor:
    """A method's map in ``layout`` as ``(N, 1, h, w)`` (class token dropped, tokens on the grid)."""
    h, w = grid
    if layout == "tokens":
        flat = m.reshape(m.shape[0], -1)  # (N, 1, T) or (N, T, 1) -> (N, T)
        if flat.shape[1] == h * w + 1:
            flat = flat[:, 1:]  # the class token
        return flat.reshape(m.shape[0], 1, h, w)
    if m.dim() == 4 and m.shape[1] != 1 and m.shape[-1] == 1:  # (N, H, W, 1)
        m = m.permute(0, 3, 1, 2)
    return m


def compute_maps(
    method: str,
    model: nn.Module,
    layers: Sequence[nn.Module],
    inputs: Tensor,
    targets: Tensor,
    options: Optional[Dict[str, Any]] = None,
    layouts: Union[None, str, Sequence[Tuple[str, Tuple[int, int]]]] = None,
) -> List[Tensor]:
    r"""Maps of one registered method at several layers, as images.

    Args:
        method (str): a name in :data:`captum_normgrad.registry.METHODS` with one-channel maps.
        model (nn.Module): the model (not modified).
        layers (sequence of nn.Module): layers of ``model``.
        inputs (Tensor): ``(N, C, H, W)`` preprocessed inputs.
        targets (Tensor): ``(N,)`` class indices.
        options (dict, optional): ``attribute()`` options; those the method does not take
                    (:attr:`MethodEntry.options <captum_normgrad.registry.MethodEntry.options>`) and
                    ``None`` values are ignored, so one set of command-line options serves every
                    method (e.g. ``epsilon`` only reaches the order-1 methods). Default: None
        layouts (str or list, optional): the layers' output layouts, from :func:`detect_layouts`
                    (or a layout name for all layers; None: ``(N, C, H, W)`` expected).
                    Channels-last and token layers are explained with ``channel_dim=-1``; the
                    class token is dropped and the tokens put back on the patch grid.
                    Default: None

    Returns:
        list[Tensor]: one detached ``(N, 1, h, w)`` map per layer.

    Raises:
        CLIInputError: unknown method, a layer whose output has no spatial locations, or a method
                    that assumes channels first on a channels-last or token layer.
    """
    entry = _explain_entry(method)
    opts = {k: v for k, v in (options or {}).items() if k in entry.options and v is not None}
    if isinstance(layouts, str):
        layouts = detect_layouts(model, layers, inputs, layouts)
    if layouts is not None and any(lay != "channels_first" for lay, _ in layouts):
        if "channel_dim" not in entry.options:
            bad = next(lay for lay, _ in layouts if lay != "channels_first")
            ok = [n for n, e in METHODS.items() if "channel_dim" in e.options and not e.per_channel]
            raise CLIInputError(
                f"{entry.name} assumes (N, C, H, W) layer outputs, but a layer is {bad.replace('_', '-')}: "
                f"choose among {', '.join(ok)} for such layers"
            )
        out = []
        for k, (lay, grid) in enumerate(layouts):
            extra = {"channel_dim": -1} if lay != "channels_first" else {}
            (m,) = entry.build(model, [layers[k]]).attribute(inputs, target=targets, **{**opts, **extra})
            out.append(_check_map(method, _to_grid(m, lay, grid)))
        return out
    maps = entry.build(model, list(layers)).attribute(inputs, target=targets, **opts)
    return [_check_map(method, m) for m in maps]


def _check_map(method: str, m: Any) -> Tensor:
    if isinstance(m, (tuple, list)):
        raise CLIInputError(f"{method}: a layer returns several tensors; choose a layer with a single output")
    if m.dim() != 4 or m.shape[1] != 1:
        raise CLIInputError(
            f"{method} gives maps of shape {tuple(m.shape)}: choose a layer whose output is an image-like "
            "(N, C, H, W) tensor (e.g. a convolutional block, not the classifier), or give its layout"
        )
    return m.detach()


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    import torch
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIInputError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIInputError(f"device {spec!r} requested but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIInputError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CLIInputError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class ExplainReport:
    """What :func:`explain_files` did.

    Attributes:
        n_images (int): images explained.
        files (list[Path]): every file written (maps, overlays, the index).
        rows (list[dict]): one record per image (path, target, prediction, files).
        skipped (list[tuple[str, str]]): unreadable images skipped, with the reason.
        seconds (float): wall time.
    """

    n_images: int = 0
    files: List[Path] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _parse_target(target: Union[str, int], categories: Optional[List[str]], n_out: int) -> Optional[int]:
    """``"pred"`` -> None; an int or a category name -> its index (validated)."""
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit()):
        idx = int(target)
        if not 0 <= idx < n_out:
            raise CLIInputError(f"--target {idx} is out of range: the model has {n_out} outputs (0..{n_out - 1})")
        return idx
    if target == "pred":
        return None
    if categories:
        low = [c.lower() for c in categories]
        if target.lower() in low:
            return low.index(target.lower())
        raise CLIInputError(f"--target {target!r} is not a class name of these weights; give a class index or pred")
    raise CLIInputError(f"--target {target!r}: give a class index, or pred (class names need named weights)")


def explain_files(
    items: Sequence[ImageItem],
    loaded: LoadedModel,
    layers: Dict[str, nn.Module],
    methods: Sequence[str],
    out: Union[str, Path],
    target: Union[str, int] = "pred",
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
    formats: Sequence[str] = ("png", "npy"),
    options: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    skip_unreadable: bool = False,
    alpha: float = 0.5,
    layout: Union[str, Sequence[str]] = "auto",
    note: Optional[Callable[[str], None]] = None,
) -> ExplainReport:
    r"""Explain image files and write the results under ``out``.

    For every image, method and layer it writes ``{image}__{method}__{layer}.png`` (the map,
    upsampled and min-max normalised, over the preprocessed image), ``.npy`` and/or ``.pt`` (the raw
    map at the layer's resolution, float32, shape ``(h, w)``), and finally ``index.json`` with one
    record per image (path, target, predicted class and probabilities, files). Every file is
    written atomically (a temporary file in ``out``, then renamed): a symbolic link in ``out`` is
    replaced, never written through. Images whose output names would collide get distinct names
    (see :func:`captum_normgrad.io.find_images`).

    The model is left as it was: its train/eval mode (it runs in eval mode) and its device.

    Args:
        items (sequence of ImageItem): from :func:`captum_normgrad.io.find_images`.
        loaded (LoadedModel): from :func:`captum_normgrad.io.load_model`.
        layers (dict[str, nn.Module]): name -> layer of ``loaded.model``.
        methods (sequence of str): names in :data:`captum_normgrad.registry.METHODS`.
        out (str or Path): output folder (created).
        target (str or int, optional): ``"pred"`` (each image's predicted class), a class index
                    or a class name of the weights. Default: ``"pred"``
        batch_size (int, optional): images per forward/backward pass. Default: 8
        device (str or torch.device, optional): where to compute. Default: ``"cpu"``
        formats (sequence of str, optional): among ``"png"``, ``"npy"``, ``"pt"``.
                    Default: ``("png", "npy")``
        options (dict, optional): method options, see :func:`compute_maps`. Default: None
        progress (bool, optional): show a tqdm progress bar on stderr, advancing per image. Default: True
        skip_unreadable (bool, optional): skip images that do not decode (listed in the report)
                    instead of stopping with :class:`~captum_normgrad.io.CLIInputError`. Default: False
        alpha (float, optional): heat-map opacity of the overlays. Default: 0.5
        layout (str or sequence of str, optional): the layers' output layout, see
                    :func:`detect_layouts`. Default: ``"auto"``
        note (callable, optional): receives one-line notes (the cost estimate of order-1 methods
                    on many images). Default: None (printed above the progress bar when
                    ``progress``, else dropped)

    Returns:
        ExplainReport
    """
    import torch
    from torch import Tensor
    from tqdm.auto import tqdm

    from .io import _unique_names, write_file_atomic

    if batch_size < 1:
        raise CLIInputError(f"--batch-size must be at least 1, got {batch_size}")
    bad = [f for f in formats if f not in ("png", "npy", "pt")]
    if bad or not formats:
        raise CLIInputError(f"unknown output format(s) {bad or formats}: choose among png, npy, pt")
    methods = explain_method_names(methods)  # deprecated aliases warn once, here
    items = _unique_names(list(items))
    dev = resolve_device(device) if isinstance(device, str) else device
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    modes = {m: m.training for m in model.modules()}
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else None
    if note is None:
        note = (lambda text: tqdm.write(f"note: {text}", file=sys.stderr)) if progress else (lambda text: None)
    layer_names = list(layers)
    layer_mods = [layers[n] for n in layer_names]
    report = ExplainReport()
    t0 = time.perf_counter()
    fixed_target: Optional[int] = None
    target_checked = False
    layouts: Optional[List[Tuple[str, Tuple[int, int]]]] = None
    zero_noted: set = set()
    order1 = [m for m in methods if METHODS[m].order == 1]
    if order1 and len(items) > batch_size:
        note(
            f"{', '.join(order1)} on {len(items)} images: an order-1 map costs one per-sample training step "
            "(about 15-40x a normgrad map on a CPU, see docs/benchmarks.md); a time estimate follows the first batch"
        )
    bar = tqdm(total=len(items), desc="explain", unit="img", disable=not progress, leave=False)
    try:
        model.to(dev).eval()
        for start in range(0, len(items), batch_size):
            t_batch = time.perf_counter()
            batch: List[ImageItem] = []
            tensors: List[Tensor] = []
            for it in items[start:start + batch_size]:
                try:
                    tensors.append(loaded.preprocess(load_image(it.path)))
                    batch.append(it)
                except CLIInputError as e:
                    if not skip_unreadable:
                        raise
                    report.skipped.append((str(it.path), str(e)))
                    bar.update(1)
            if not batch:
                continue
            x = torch.stack(tensors).to(dev)
            with torch.no_grad():
                logits = model(x)
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                raise CLIInputError(
                    f"the model returns {tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                    ", not (N, classes) logits: explain needs a classification model"
                )
            if not target_checked:
                fixed_target = _parse_target(target, loaded.categories, logits.shape[1])
                target_checked = True
            if layouts is None:
                layouts = detect_layouts(model, layer_mods, x, layout)
            probs = logits.float().softmax(1)
            pred = probs.argmax(1)
            tgt = pred.clone() if fixed_target is None else torch.full_like(pred, fixed_target)
            with warnings.catch_warnings():
                # all-zero maps are reported below, once per method and layer, with the images' names
                warnings.filterwarnings("ignore", message=r".*the map of example\(s\) .* is all zero", category=UserWarning)
                maps = {method: [m.cpu() for m in compute_maps(method, model, layer_mods, x, tgt, options, layouts)]
                        for method in methods}
            display = loaded.to_display(x.detach().cpu())
            for method in methods:
                for lname, m in zip(layer_names, maps[method]):
                    dead = [it.name for i, it in enumerate(batch) if not m[i].any()]
                    if dead and (method, lname) not in zero_noted:
                        zero_noted.add((method, lname))
                        note(
                            f"{method} at {lname} is zero everywhere for {', '.join(dead[:3])}"
                            f"{' ...' if len(dead) > 3 else ''}: the target's gradient vanishes there (an untrained "
                            "or zero-initialised classifier head, e.g. torchvision's random-init ViT, or dead ReLUs); "
                            "such maps carry no information"
                        )
            for i, it in enumerate(batch):
                row: Dict[str, Any] = {
                    "image": str(it.path),
                    "name": it.name,
                    "target": int(tgt[i]),
                    "pred": int(pred[i]),
                    "prob_target": float(probs[i, tgt[i]]),
                    "prob_pred": float(probs[i, pred[i]]),
                    "files": [],
                }
                if loaded.categories and len(loaded.categories) == logits.shape[1]:
                    row["target_name"] = loaded.categories[int(tgt[i])]
                    row["pred_name"] = loaded.categories[int(pred[i])]
                for method in methods:
                    for lname, m in zip(layer_names, maps[method]):
                        stem = out_dir / f"{it.name}__{method}__{lname}"
                        written = save_map(stem, m[i, 0], formats)
                        if "png" in formats:
                            written.append(save_overlay(stem.with_name(stem.name + ".png"), display[i], m[i, 0], alpha))
                        row["files"].extend(str(p) for p in written)
                        report.files.extend(written)
                report.rows.append(row)
                report.n_images += 1
                bar.update(1)
            if start == 0 and order1 and len(items) > len(batch):
                per_image = (time.perf_counter() - t_batch) / len(batch)
                left = len(items) - start - len(batch)
                note(f"about {per_image:.2f} s per image: {left} images left, about {_duration(per_image * left)}")
    finally:
        bar.close()
        if home is not None and dev != home:
            model.to(home)
        for m, mode in modes.items():
            m.training = mode
    report.seconds = time.perf_counter() - t0
    index = out_dir / "index.json"
    payload = {
        "model": loaded.description,
        "layers": layer_names,
        "layouts": {n: lay for n, (lay, _) in zip(layer_names, layouts or [])},
        "methods": list(methods),
        "target": str(target),
        "options": {k: v for k, v in (options or {}).items() if v is not None},
        "images": report.rows,
        "skipped": [{"image": p, "reason": r} for p, r in report.skipped],
        "seconds": round(report.seconds, 3),
    }
    write_file_atomic(index, (json.dumps(payload, indent=1) + "\n").encode("utf-8"))
    report.files.append(index)
    return report


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
