r"""Layers by name: the one lookup of the package (plumbing floor).

* :func:`unwrap_model`: the model inside ``nn.DataParallel`` / ``DistributedDataParallel``.
* :func:`layer_names`, :func:`get_layer`, :func:`get_layers`: names as in ``model.named_modules()``
  (with or without the ``module.`` prefix of a wrapped model), the benchmark models' ``blockN``
  aliases (``model.block_names``), and an error that lists the valid names and the closest ones.
* :func:`suggest_layers`: layers worth explaining at several depths (the end of each stage), by
  a rule that holds for every torchvision classification architecture.

Errors are :class:`UnknownLayerError` (a ``ValueError``) with a one-line message naming the fix.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported where it is used, so that `captum-normgrad --help` stays fast
    import torch
    from torch import nn

__all__ = [
    "UnknownLayerError",
    "unwrap_model",
    "layer_names",
    "layer_aliases",
    "get_layer",
    "get_layers",
    "module_by_name",
    "suggest_layers",
    "layout_of",
]


class UnknownLayerError(ValueError):
    """No layer of that name (the message lists valid names and the closest matches)."""


def unwrap_model(model: "nn.Module") -> "nn.Module":
    """The module inside (possibly nested) ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers."""
    from torch import nn

    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def layer_names(model: "nn.Module") -> List[str]:
    """Every submodule's dotted name, in ``named_modules()`` order (the root excluded; wrappers unwrapped)."""
    return [n for n, _ in unwrap_model(model).named_modules() if n]


def layer_aliases(model: "nn.Module") -> Dict[str, str]:
    """``{"block1": name, ...}`` from ``model.block_names`` (the benchmark models), else ``{}``."""
    names = getattr(unwrap_model(model), "block_names", None) or []
    return {f"block{i + 1}": str(n) for i, n in enumerate(names)}


def get_layer(model: "nn.Module", name: str) -> "nn.Module":
    r"""The submodule called ``name``.

    Args:
        model (nn.Module): the model; a ``DataParallel``/``DistributedDataParallel`` wrapper is
                    looked through (names with or without its ``module.`` prefix work).
        name (str): a dotted name of ``model.named_modules()``, or a benchmark alias ``blockN``.

    Returns:
        nn.Module: the layer (a module of the unwrapped model).

    Raises:
        TypeError: ``name`` is not a string.
        UnknownLayerError: unknown name; the message lists the valid names (all of them up to two
                    levels deep, with a count of the deeper ones) and the closest matches.
    """
    if not isinstance(name, str):
        raise TypeError(f"a layer name must be a str such as 'layer3', got {type(name).__name__}")
    inner = unwrap_model(model)
    modules = dict(inner.named_modules())
    key = name
    while key.startswith("module.") and key not in modules and inner is not model:
        key = key[len("module."):]
    key = layer_aliases(inner).get(key, key)
    if key and key in modules:
        return modules[key]
    names = [n for n in modules if n]
    aliases = list(layer_aliases(inner))
    close = difflib.get_close_matches(name, names + aliases, n=3)
    shallow = [n for n in names if n.count(".") <= 1]
    deeper = len(names) - len(shallow)
    msg = f"unknown layer {name!r}"
    if close:
        msg += f" (did you mean {', '.join(close)}?)"
    msg += f"; valid names: {', '.join(aliases + shallow) or '(the model has no submodules)'}"
    if deeper:
        msg += f" (and {deeper} deeper names: `captum-normgrad layers` lists them all)"
    raise UnknownLayerError(msg)


def module_by_name(model: "nn.Module", name: str) -> "nn.Module":
    r"""Like :func:`get_layer`, and ``""`` is the (unwrapped) model itself.

    Layers are looked up by name, never kept as objects, wherever the model may be a deep copy
    (sanity checks, Quantus): the name resolves to the copy's own module.

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> module_by_name(net, "0")
        Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module to look layers up by name, got {type(model).__name__}")
    if name == "":
        return unwrap_model(model)
    return get_layer(model, name)


def get_layers(model: "nn.Module", names: Sequence[str]) -> List["nn.Module"]:
    """:func:`get_layer` for each name, in order."""
    return [get_layer(model, n) for n in names]


# --------------------------------------------------------------------------- suggestions


def _record_outputs(
    model: "nn.Module", inputs: "torch.Tensor"
) -> Tuple[Dict[str, "torch.Tensor"], Dict[str, int], Dict[str, int]]:
    """Output of every named module on one forward pass, with its first start and last finish times."""
    import torch

    outputs: Dict[str, torch.Tensor] = {}
    start: Dict[str, int] = {}
    finish: Dict[str, int] = {}
    clock = [0]

    def pre(name: str):  # type: ignore[no-untyped-def]
        def fn(mod, inp):  # type: ignore[no-untyped-def]
            clock[0] += 1
            start.setdefault(name, clock[0])

        return fn

    def post(name: str):  # type: ignore[no-untyped-def]
        def fn(mod, inp, out):  # type: ignore[no-untyped-def]
            clock[0] += 1
            if isinstance(out, torch.Tensor):
                outputs[name] = out.detach()
                finish[name] = clock[0]

        return fn

    handles = []
    for n, m in model.named_modules():
        if n:
            handles += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs, start, finish


def suggest_layers(model: "nn.Module", image_size: int = 224, max_layers: int = 4) -> List[str]:
    r"""Layers worth explaining at several depths: the end of each stage, by a rule.

    Rule: run the model once on a blank ``image_size`` image and keep, in execution order, the
    modules whose output has a spatial layout (:func:`layout_of`: ``(N, C, H, W)``, Swin's
    ``(N, H, W, C)`` or a ViT token sequence) with at least 2 locations, except pooling, dropout,
    identity and flatten modules (and containers whose output is a pooling's output). A *stage*
    ends at the last such module before the grid shrinks, and at the last one overall; among
    modules ending at the same point the coarsest is chosen (``layer3`` rather than
    ``layer3.1.relu``). A model of constant grid (a vision transformer) gets evenly spaced blocks
    of its longest sequence of blocks instead, the last block excluded (its patch tokens do not
    reach a head that reads the class token: their maps would be zero). The last ``max_layers`` stage ends are returned,
    shallow to deep.

    Args:
        model (nn.Module): a classification model (``DataParallel`` is unwrapped).
        image_size (int, optional): side of the blank test image. Default: 224
        max_layers (int, optional): at most this many layers. Default: 4

    Returns:
        list[str]: layer names for :func:`get_layer`, shallow to deep.

    Raises:
        ValueError: no layer has a spatial output (not an image model).
    """
    import torch

    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        param = next(inner.parameters(), None)
        g = torch.Generator().manual_seed(0)  # noise, not a blank image: distinct outputs stay distinct
        x = torch.rand(1, 3, image_size, image_size, generator=g)
        x = x.to(param.device) if param is not None else x
        outputs, start, finish = _record_outputs(inner, x)
    finally:
        inner.train(was_training)
    modules = dict(inner.named_modules())

    def spatial(name: str) -> Optional[Tuple[int, int]]:
        out = outputs.get(name)
        if out is None or out.shape[0] != 1:
            return None
        lay = layout_of(tuple(out.shape), (image_size, image_size))
        if lay is None or lay[1][0] * lay[1][1] < 2:
            return None
        return lay[1]

    seq = sorted(outputs, key=lambda n: finish[n])  # in the order they finished
    skipped = [n for n in seq if isinstance(modules[n], _SKIP_TYPES())]
    skipped_out = [outputs[n] for n in skipped]

    def same_as_skipped(name: str) -> bool:  # a container that ends with a pooling (VGG's `features`)
        o = outputs[name]
        return any(t.shape == o.shape and torch.equal(t, o) for t in skipped_out)

    candidates = [n for n in seq if spatial(n) is not None and n not in skipped and not same_as_skipped(n)]
    if not candidates:
        raise ValueError(
            f"no layer of {type(inner).__name__} gives a spatial (N, C, H, W) or token output on a "
            f"{image_size}x{image_size} image: explain needs an image model"
        )

    def area(n: str) -> int:
        h, w = spatial(n)  # type: ignore[misc]
        return h * w

    # shrinks: candidates whose grid is smaller than every grid before them
    shrinks: List[str] = []
    smallest = area(candidates[0])
    for n in candidates[1:]:
        if area(n) < smallest:
            shrinks.append(n)
            smallest = area(n)

    def ancestors(n: str) -> List[str]:  # outermost first, the module itself last
        parts = n.split(".")
        return [".".join(parts[: i + 1]) for i in range(len(parts))]

    ends: List[str] = []
    for b in shrinks:
        # the outermost block holding this shrink and no other: the stage starts with it
        block = next(
            (a for a in ancestors(b) if a in start and sum(s == a or s.startswith(a + ".") for s in shrinks) == 1), b
        )
        before = [n for n in candidates if finish[n] < start.get(block, finish[b])]
        if before:
            ends.append(before[-1])
    ends.append(candidates[-1])
    # the coarsest module ending at the same point: climb to the parent while it gives the same output
    chosen: List[str] = []
    for e in ends:
        name = e
        while "." in name:
            parent = name.rsplit(".", 1)[0]
            if parent in outputs and outputs[parent].shape == outputs[name].shape and torch.equal(
                outputs[parent], outputs[name]
            ):
                name = parent
            else:
                break
        if name not in chosen:
            chosen.append(name)
    if len(chosen) < 2:  # constant grid (vision transformers): evenly spaced blocks of the longest sequence
        chosen = _evenly_spaced_blocks(inner, candidates, max_layers) or chosen
    return chosen[-max_layers:]


def _SKIP_TYPES() -> Tuple[type, ...]:
    """Module types that are never a useful end of a stage (inputs of the head, pure reshapes)."""
    from torch import nn

    return (nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _evenly_spaced_blocks(model: "nn.Module", candidates: List[str], k: int) -> List[str]:
    """For a constant-grid model: ``k`` evenly spaced children of the longest sequence of blocks."""
    from torch import nn

    best: List[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) >= 2:
            kids = [f"{name}.{k}" if name else k for k, _ in mod.named_children()]
            kids = [c for c in kids if c in candidates]
            if len(kids) > len(best):
                best = kids
    # the last block's output tokens reach the head only through the class token (ViT reads x[:, 0]):
    # their gradient is zero, so the last block is left out
    best = best[:-1]
    if len(best) < 2:
        return []
    n = len(best)
    idx = sorted({round((i + 1) * n / k) - 1 for i in range(k)})
    return [best[i] for i in idx if 0 <= i < n]


def layout_of(shape: Tuple[int, ...], image_hw: Tuple[int, int]) -> Optional[Tuple[str, Tuple[int, int]]]:
    r"""Guess the spatial layout of a layer output from its shape.

    Args:
        shape (tuple[int, ...]): the output's shape, batch first.
        image_hw (tuple[int, int]): the input image's height and width.

    Returns:
        ``("channels_first", (H, W))`` for ``(N, C, H, W)``; ``("channels_last", (H, W))`` for
        ``(N, H, W, C)`` (Swin); ``("tokens", (h, w))`` for ``(N, T, C)`` with ``T = h * w`` or
        ``T = 1 + h * w`` (a class token first, as in ViT); None when it has no spatial layout.
    """
    if len(shape) == 4:
        _, a, b, c = shape
        first_ok = _plausible_grid((b, c), image_hw)
        last_ok = _plausible_grid((a, b), image_hw)
        if last_ok and not first_ok:
            return ("channels_last", (a, b))
        if first_ok and not last_ok:
            return ("channels_first", (b, c))
        if first_ok and last_ok:
            # both read as a grid: channels-last only when the channel dim is clearly the largest
            # and the would-be channels-first grid is not square
            if b != c and a == b:
                return ("channels_last", (a, b))
            return ("channels_first", (b, c))
        return None
    if len(shape) == 3:
        _, t, _c = shape
        for drop in (1, 0):
            side = int(round(max(t - drop, 0) ** 0.5))
            if side >= 1 and side * side == t - drop:
                return ("tokens", (side, side))
    return None


def _plausible_grid(hw: Tuple[int, int], image_hw: Tuple[int, int]) -> bool:
    """``hw`` could be a downsampled grid of the image: each side at most the image's, same aspect."""
    h, w = hw
    H, W = image_hw
    if h < 1 or w < 1 or h > H or w > W:
        return False
    return abs(h / H - w / W) <= max(1.0 / H, 1.0 / W) * 2 + 1e-9 or (h == 1 and w == 1)
