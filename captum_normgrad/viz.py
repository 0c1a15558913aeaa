r"""Figures built on :mod:`captum.attr.visualization`, drawn headless (Agg) and written as PNG.

* :func:`compute_attribution_grid` computes the maps of several methods at several layers;
* :func:`plot_attribution_grid` draws them as a grid of methods (rows) x layers (columns) over the
  image, the layout of Figure 1 of the NormGrad paper (first column: the image);
* :func:`plot_randomization` and :func:`plot_randomization_maps` draw the results of
  :func:`captum_normgrad.sanity.model_parameter_randomization`.

This is the only module of the package that imports matplotlib. Figures are created with
:class:`matplotlib.figure.Figure` and an Agg canvas, never through ``pyplot``, so they work without
a display and leave pyplot's global state alone.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .metrics.adapters import module_by_name, reduce_map_channels, resize_maps

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .sanity import RandomizationResult

__all__ = [
    "compute_attribution_grid",
    "plot_attribution_grid",
    "plot_randomization",
    "plot_randomization_maps",
    "save_figure",
]

MethodSpec = Union[Callable[..., Any], Tuple[Callable[..., Any], Dict[str, Any]]]


def _new_figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: "Figure", path: Union[str, os.PathLike], dpi: int = 100) -> str:
    r"""Write a figure to ``path`` (PNG unless the extension says otherwise) with the Agg canvas.

    Missing parent folders are created.

    Args:
        fig (matplotlib.figure.Figure): the figure.
        path (str or PathLike): output file.
        dpi (int, optional): resolution. Default: 100

    Returns:
        str: the path written.

    Examples::

        >>> fig = plot_attribution_grid(image, {"NormGrad": {"conv4": maps}})
        >>> save_figure(fig, "out/grid.png")
        'out/grid.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- maps grid


def compute_attribution_grid(
    model: nn.Module,
    inputs: Tensor,
    methods: Mapping[str, MethodSpec],
    layers: Sequence[str],
    target: Any = None,
    additional_forward_args: Any = None,
) -> Dict[str, Dict[str, Tensor]]:
    r"""Maps of several attribution methods at several layers, ready for :func:`plot_attribution_grid`.

    Args:
        model (torch.nn.Module): the model (only hooked by the methods, never modified by them).
        inputs (Tensor): ``(N, C, H, W)`` images.
        methods (Mapping[str, Callable or tuple]): display name -> attribution class or factory
                    ``method(model, layer)``, or ``(factory, attribute_kwargs)``.
        layers (sequence of str): layer names (``dict(model.named_modules())`` keys).
        target (Any, optional): target class(es), as in Captum. Default: None
        additional_forward_args (Any, optional): extra forward arguments. Default: None

    Returns:
        dict[str, dict[str, Tensor]]: ``maps[method][layer]`` of shape ``(N, C_l, h, w)``.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> maps = compute_attribution_grid(
        >>>     net, x, {"NormGrad": LayerNormGrad,
        >>>              "Grad-CAM": (LayerGradCam, {"relu_attributions": True})},
        >>>     ["conv2", "conv4"], target=3)
    """
    if not methods:
        raise ValueError("methods is empty; give at least one display name -> attribution class")
    if isinstance(layers, str) or not layers:
        raise ValueError("layers must be a non-empty list of layer names, e.g. ['layer2', 'layer4']")
    mods = {name: module_by_name(model, name) for name in layers}
    out: Dict[str, Dict[str, Tensor]] = {}
    for label, spec in methods.items():
        factory, kwargs = (spec if isinstance(spec, tuple) else (spec, {}))
        if not callable(factory):
            raise TypeError(f"method {label!r} must be an attribution class or factory, got {type(factory).__name__}")
        row: Dict[str, Tensor] = {}
        for name in layers:
            kw = dict(kwargs)
            if additional_forward_args is not None:
                kw["additional_forward_args"] = additional_forward_args
            res = factory(model, mods[name]).attribute(inputs, target=target, **kw)
            if isinstance(res, tuple):
                res = res[0]
            row[name] = res.detach()
        out[label] = row
    return out


def _image_hwc(image: Union[Tensor, np.ndarray], sample: int) -> np.ndarray:
    """Image as an (H, W, 3) float array in [0, 1]; tensors are channels-first, arrays (H, W, C)."""
    is_tensor = isinstance(image, Tensor)
    img = (image.detach().cpu().numpy() if is_tensor else np.asarray(image)).astype(np.float64)
    if img.ndim == 4:
        img = img[sample]
    if img.ndim == 3 and (is_tensor or img.shape[-1] not in (1, 3)):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(
            f"image must be a (C, H, W) or (N, C, H, W) tensor, or an (H, W, C) array, with 1 or 3 channels; "
            f"got shape {tuple(image.shape)}"
        )
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def _map_hw(m: Union[Tensor, np.ndarray], sample: int, size: Tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(m).detach().cpu().double()
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"maps must be (N, C, h, w), (C, h, w) or (h, w), got {tuple(t.shape)}")
    t = reduce_map_channels(t[sample : sample + 1], "sum")
    return resize_maps(t, size, "bilinear")[0, 0].numpy()


def plot_attribution_grid(
    image: Union[Tensor, np.ndarray],
    maps: Mapping[str, Mapping[str, Union[Tensor, np.ndarray]]],
    path: Optional[Union[str, os.PathLike]] = None,
    sample: int = 0,
    method: str = "blended_heat_map",
    sign: str = "auto",
    cmap: Optional[str] = None,
    outlier_perc: float = 2,
    alpha_overlay: float = 0.5,
    cell_size: float = 2.0,
    show_image: bool = True,
    title: Optional[str] = None,
    dpi: int = 100,
) -> "Figure":
    r"""Grid of attribution maps, methods (rows) x layers (columns), over the image.

    The layout of Figure 1 of the NormGrad paper: the first column shows the image, then one
    column per layer (depth). Each cell is drawn by
    :func:`captum.attr.visualization.visualize_image_attr` after bilinear upsampling of the map to
    the image. An all-zero map (e.g. Grad-CAM with ReLU at an early layer) is shown as the bare
    image titled "zero map" (Captum cannot normalise it).

    Args:
        image (Tensor or ndarray): ``(C, H, W)`` / ``(N, C, H, W)`` tensor or ``(H, W, C)`` array;
                    values outside ``[0, 1]`` are min-max scaled for display.
        maps (Mapping): ``maps[method_name][layer_name]`` -> map ``(N, C_l, h, w)``, ``(h, w)``...
                    (e.g. from :func:`compute_attribution_grid`); missing cells stay blank.
        path (str or PathLike, optional): write the figure there (PNG). Default: None
        sample (int, optional): which sample of a batch to show. Default: 0
        method (str, optional): Captum visualisation method (``"blended_heat_map"``,
                    ``"heat_map"``, ``"masked_image"``, ``"alpha_scaling"``).
                    Default: ``"blended_heat_map"``
        sign (str, optional): Captum sign; ``"auto"`` uses ``"absolute_value"`` for
                    non-negative maps and ``"all"`` for signed ones. Default: ``"auto"``
        cmap (str, optional): colour map, Captum's default when None. Default: None
        outlier_perc (float, optional): Captum's outlier percentage. Default: 2
        alpha_overlay (float, optional): heat-map opacity. Default: 0.5
        cell_size (float, optional): size of one cell in inches. Default: 2.0
        show_image (bool, optional): add the image column. Default: True
        title (str, optional): figure title. Default: None
        dpi (int, optional): resolution of the written PNG. Default: 100

    Returns:
        matplotlib.figure.Figure: the figure (Agg canvas).

    Examples::

        >>> fig = plot_attribution_grid(x[0], maps, "out/figure1.png", title="class 3")
    """
    from captum.attr import visualization as viz

    if not maps:
        raise ValueError("maps is empty; give maps[method][layer] tensors")
    img = _image_hwc(image, sample)
    size = (img.shape[0], img.shape[1])
    rows = list(maps)
    cols: list = []
    for r in rows:
        for c in maps[r]:
            if c not in cols:
                cols.append(c)
    off = 1 if show_image else 0
    ncols = len(cols) + off
    fig = _new_figure(cell_size * ncols, cell_size * len(rows) + (0.4 if title else 0.0))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, r in enumerate(rows):
        if show_image:
            ax = axes[i][0]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(r)
            if i == 0:
                ax.set_title("image")
        for j, c in enumerate(cols):
            ax = axes[i][j + off]
            head = c if i == 0 else None
            if c not in maps[r]:
                ax.axis("off")
                continue
            m = _map_hw(maps[r][c], sample, size)
            if not show_image and j == 0:
                ax.set_ylabel(r)
            if not np.any(m):
                ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{c}\n(zero map)" if head else "(zero map)", fontsize=8)
                continue
            s = sign if sign != "auto" else ("absolute_value" if float(m.min()) >= 0 else "all")
            viz.visualize_image_attr(
                m[:, :, None], img, method=method, sign=s, plt_fig_axis=(fig, ax), outlier_perc=outlier_perc,
                cmap=cmap, alpha_overlay=alpha_overlay, title=head, use_pyplot=False,
            )
            if not show_image and j == 0:
                ax.set_ylabel(r)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


# --------------------------------------------------------------------------- sanity-check plots


def plot_randomization(
    result: "RandomizationResult",
    path: Optional[Union[str, os.PathLike]] = None,
    measures: Optional[Sequence[str]] = None,
    dpi: int = 100,
) -> "Figure":
    r"""Similarity to the original map vs randomised depth (mean over samples, with min-max band).

    Args:
        result (RandomizationResult): from :func:`captum_normgrad.sanity.model_parameter_randomization`.
        path (str or PathLike, optional): write the figure there (PNG). Default: None
        measures (sequence of str, optional): measures to draw; all four when None. Default: None
        dpi (int, optional): resolution. Default: 100

    Returns:
        matplotlib.figure.Figure: the figure.

    Examples::

        >>> res = model_parameter_randomization(net, LayerNormGrad, "conv4", x)
        >>> plot_randomization(res, "out/mprt.png")
    """
    keys = list(result.similarity) if measures is None else list(measures)
    unknown = [k for k in keys if k not in result.similarity]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; choose from {list(result.similarity)}")
    steps = np.arange(1, len(result.modules) + 1)
    means = result.mean()
    fig = _new_figure(max(4.0, 0.5 * len(steps) + 2.0), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for k in keys:
        v = result.similarity[k]
        ax.plot(steps, means[k], marker="o", label=k)
        with np.errstate(invalid="ignore"):
            if v.shape[1] > 1 and np.isfinite(v).any():
                lo = np.where(np.isfinite(v), v, np.nan)
                ax.fill_between(steps, np.nanmin(lo, 1), np.nanmax(lo, 1), alpha=0.15)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xticklabels(result.modules, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(f"randomised module ({result.mode}, top-down)")
    ax.set_ylabel("similarity to original map")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(f"{result.method} @ {result.layer}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def plot_randomization_maps(
    result: "RandomizationResult",
    path: Optional[Union[str, os.PathLike]] = None,
    sample: int = 0,
    cell_size: float = 1.6,
    dpi: int = 100,
) -> "Figure":
    r"""The original map and the map after each randomisation step, for one sample.

    Maps are shown as ``[0, 1]`` absolute maps (:func:`captum_normgrad.sanity.normalize_abs`).

    Args:
        result (RandomizationResult): a result computed with ``keep_maps=True``.
        path (str or PathLike, optional): write the figure there (PNG). Default: None
        sample (int, optional): which sample. Default: 0
        cell_size (float, optional): size of one panel in inches. Default: 1.6
        dpi (int, optional): resolution. Default: 100

    Returns:
        matplotlib.figure.Figure: the figure.

    Examples::

        >>> plot_randomization_maps(res, "out/mprt_maps.png")
    """
    from .sanity import normalize_abs

    if result.original_maps is None or result.randomized_maps is None:
        raise ValueError("the result has no maps; run model_parameter_randomization with keep_maps=True")
    panels = [("original", result.original_maps[sample])] + [
        (name, result.randomized_maps[i][sample]) for i, name in enumerate(result.modules)
    ]
    ncols = min(len(panels), 8)
    nrows = int(math.ceil(len(panels) / ncols))
    fig = _new_figure(cell_size * ncols, cell_size * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(panels):
            name, m = panels[k]
            ax.imshow(normalize_abs(m if m.ndim == 2 else m.reshape(1, -1)), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(name, fontsize=7)
    fig.suptitle(f"{result.method} @ {result.layer} ({result.mode})", fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi)
    return fig
