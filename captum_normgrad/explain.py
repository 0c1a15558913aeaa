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
import time
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


def compute_maps(
    method: str,
    model: nn.Module,
    layers: Sequence[nn.Module],
    inputs: Tensor,
    targets: Tensor,
    options: Optional[Dict[str, Any]] = None,
) -> List[Tensor]:
    r"""Maps of one registered method at several layers.

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

    Returns:
        list[Tensor]: one detached ``(N, 1, h, w)`` map per layer.

    Raises:
        CLIInputError: unknown method, or a layer whose output has no spatial locations.
    """
    entry = _explain_entry(method)
    opts = {k: v for k, v in (options or {}).items() if k in entry.options and v is not None}
    maps = entry.build(model, list(layers)).attribute(inputs, target=targets, **opts)
    out = []
    for m in maps:
        if isinstance(m, (tuple, list)):
            raise CLIInputError(f"{method}: a layer returns several tensors; choose a layer with a single output")
        if m.dim() != 4 or m.shape[1] != 1:
            raise CLIInputError(
                f"{method} gives maps of shape {tuple(m.shape)}: choose a layer whose output is an image-like "
                "(N, C, H, W) tensor (e.g. a convolutional block, not the classifier)"
            )
        out.append(m.detach())
    return out


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
) -> ExplainReport:
    r"""Explain image files and write the results under ``out``.

    For every image, method and layer it writes ``{image}__{method}__{layer}.png`` (the map,
    upsampled and min-max normalised, over the preprocessed image), ``.npy`` and/or ``.pt`` (the raw
    map at the layer's resolution, float32, shape ``(h, w)``), and finally ``index.json`` with one
    record per image (path, target, predicted class and probabilities, files).

    Args:
        items (sequence of ImageItem): from :func:`captum_normgrad.io.find_images`.
        loaded (LoadedModel): from :func:`captum_normgrad.io.load_model`.
        layers (dict[str, nn.Module]): name -> layer of ``loaded.model``.
        methods (sequence of str): names in :data:`METHODS`.
        out (str or Path): output folder (created).
        target (str or int, optional): ``"pred"`` (each image's predicted class), a class index
                    or a class name of the weights. Default: ``"pred"``
        batch_size (int, optional): images per forward/backward pass. Default: 8
        device (str or torch.device, optional): where to compute. Default: ``"cpu"``
        formats (sequence of str, optional): among ``"png"``, ``"npy"``, ``"pt"``.
                    Default: ``("png", "npy")``
        options (dict, optional): method options, see :func:`compute_maps`. Default: None
        progress (bool, optional): show a tqdm progress bar on stderr. Default: True
        skip_unreadable (bool, optional): skip images that do not decode (listed in the report)
                    instead of stopping with :class:`~captum_normgrad.io.CLIInputError`. Default: False
        alpha (float, optional): heat-map opacity of the overlays. Default: 0.5

    Returns:
        ExplainReport
    """
    import torch
    from torch import Tensor
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise CLIInputError(f"--batch-size must be at least 1, got {batch_size}")
    bad = [f for f in formats if f not in ("png", "npy", "pt")]
    if bad or not formats:
        raise CLIInputError(f"unknown output format(s) {bad or formats}: choose among png, npy, pt")
    methods = explain_method_names(methods)  # deprecated aliases warn once, here
    dev = resolve_device(device) if isinstance(device, str) else device
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to(dev).eval()
    layer_names = list(layers)
    layer_mods = [layers[n] for n in layer_names]
    report = ExplainReport()
    t0 = time.perf_counter()
    fixed_target: Optional[int] = None
    target_checked = False

    bar = tqdm(total=len(items), desc="explain", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(items), batch_size):
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
            probs = logits.float().softmax(1)
            pred = probs.argmax(1)
            tgt = pred.clone() if fixed_target is None else torch.full_like(pred, fixed_target)
            rows = []
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
                rows.append(row)
            display = loaded.to_display(x.detach().cpu())
            for method in methods:
                maps = compute_maps(method, model, layer_mods, x, tgt, options)
                for lname, m in zip(layer_names, maps):
                    m = m.cpu()
                    for i, it in enumerate(batch):
                        stem = out_dir / f"{it.name}__{method}__{lname}"
                        written = save_map(stem, m[i, 0], formats)
                        if "png" in formats:
                            written.append(save_overlay(stem.with_name(stem.name + ".png"), display[i], m[i, 0], alpha))
                        rows[i]["files"].extend(str(p) for p in written)
                        report.files.extend(written)
            report.rows.extend(rows)
            report.n_images += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    index = out_dir / "index.json"
    index.write_text(
        json.dumps(
            {
                "model": loaded.description,
                "layers": layer_names,
                "methods": list(methods),
                "target": str(target),
                "options": {k: v for k, v in (options or {}).items() if v is not None},
                "images": report.rows,
                "skipped": [{"image": p, "reason": r} for p, r in report.skipped],
                "seconds": round(report.seconds, 3),
            },
            indent=1,
        )
    )
    report.files.append(index)
    return report
