r"""Figures built on :mod:`captum.attr.visualization`, drawn headless (Agg) and written as PNG.

* :func:`compute_attribution_grid` computes the maps of several methods at several layers;
* :func:`plot_attribution_grid` draws them as a grid of methods (rows) x layers (columns) over the
  image, the layout of Figure 1 of the NormGrad paper (first column: the image);
* :func:`plot_randomization` and :func:`plot_randomization_maps` draw the results of
  :func:`captum_normgrad.evaluation.model_parameter_randomization`.

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

from ._layers import module_by_name
from ._maps import reduce_map_channels, resize_maps

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .evaluation.sanity import RandomizationResult

__all__ = [
    "unnormalize",
    "crop_box",
    "map_to_original",
    "compute_attribution_grid",
    "plot_attribution_grid",
    "plot_comparison_grid",
    "overlay_map",
    "check_style",
    "plot_randomization",
    "plot_randomization_maps",
    "save_figure",
]

MethodSpec = Union[Callable[..., Any], Tuple[Callable[..., Any], Dict[str, Any]]]


def _new_figure(width: float, height: float, constrained: bool = False) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
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


# --------------------------------------------------------------------------- image geometry


def check_style(cmap: str = "viridis", alpha: float = 0.55, cmap_signed: str = "RdBu_r") -> None:
    r"""Validate overlay options before any work: colour map names and opacity.

    Args:
        cmap (str, optional): matplotlib colour map name. Default: ``"viridis"``
        alpha (float, optional): opacity of the map, in ``[0, 1]``. Default: 0.55
        cmap_signed (str, optional): colour map of signed maps. Default: ``"RdBu_r"``

    Raises:
        ValueError: an unknown colour map or an opacity outside ``[0, 1]``.
    """
    from matplotlib import colormaps

    for name in (cmap, cmap_signed):
        if name not in colormaps:
            raise ValueError(f"unknown colour map {name!r}; use a matplotlib name such as 'viridis', 'magma', 'RdBu_r'")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha is the opacity of the map and must lie in [0, 1], got {alpha}")


def unnormalize(
    x: Union[Tensor, np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
    clamp: bool = True,
) -> Tensor:
    r"""Undo a model's input normalisation: ``x * std + mean`` per channel, for display.

    A map overlaid on a *normalised* image shows wrong colours (ImageNet normalisation turns a
    white wall into a pale cyan one and shifts every hue); overlay on the image this returns.

    Args:
        x (Tensor or ndarray): ``(C, H, W)`` or ``(N, C, H, W)`` normalised images
                    (channels first, as the model receives them).
        mean (sequence of float): per-channel mean used by the normalisation (e.g.
                    ``weights.transforms().mean``, ``(0.485, 0.456, 0.406)`` for ImageNet).
        std (sequence of float): per-channel standard deviation (``(0.229, 0.224, 0.225)``).
        clamp (bool, optional): clip the result to ``[0, 1]``. Default: True

    Returns:
        Tensor: same shape as ``x``, ``float``, values in ``[0, 1]`` when ``clamp``.

    Examples::

        >>> weights = torchvision.models.ResNet50_Weights.DEFAULT
        >>> t = weights.transforms()
        >>> shown = unnormalize(t(photo), t.mean, t.std)      # (3, 224, 224) in [0, 1]
    """
    t = torch.as_tensor(x).detach()
    if not t.is_floating_point():
        t = t.float()
    if t.dim() not in (3, 4):
        raise ValueError(f"unnormalize expects (C, H, W) or (N, C, H, W) images, got shape {tuple(t.shape)}")
    c = t.shape[-3]
    mean_t = torch.as_tensor(mean, dtype=t.dtype, device=t.device).flatten()
    std_t = torch.as_tensor(std, dtype=t.dtype, device=t.device).flatten()
    if mean_t.numel() != c or std_t.numel() != c:
        raise ValueError(
            f"mean and std need one value per channel ({c} channels in dimension -3 of the images), got "
            f"{mean_t.numel()} and {std_t.numel()}; images must be channels-first"
        )
    if bool((std_t <= 0).any()):
        raise ValueError(f"std must be positive, got {std_t.tolist()}")
    out = t * std_t.view(-1, 1, 1) + mean_t.view(-1, 1, 1)
    return out.clamp(0, 1) if clamp else out


def crop_box(
    original_size: Sequence[int],
    resize_size: Optional[int],
    crop_size: Union[int, Sequence[int]],
) -> Tuple[float, float, float, float]:
    r"""Where a resize-then-centre-crop preprocessing took its input from, in original pixels.

    The geometry of torchvision's classification presets (``weights.transforms()``): the shorter
    side is resized to ``resize_size`` (aspect ratio kept), then a ``crop_size`` square (or
    ``(h, w)``) is cut from the centre. The model sees only that box of the photograph.

    Args:
        original_size (sequence of int): ``(H, W)`` of the original image.
        resize_size (int, optional): the shorter side after resizing; None for no resize.
        crop_size (int or sequence of int): side (or ``(h, w)``) of the centre crop.

    Returns:
        tuple[float, float, float, float]: ``(top, left, height, width)`` of the box in the
        original image's pixels (fractional: the box is exact, rounding is left to the caller).

    Examples::

        >>> top, left, h, w = crop_box((480, 640), 256, 224)   # a 4:3 photo, ImageNet preprocessing
        >>> round(top), round(left), round(h), round(w)        # resized to 256 x 341, crop at (16, 58)
        (30, 109, 420, 420)
    """
    if len(original_size) != 2:
        raise ValueError(f"original_size must be (H, W), got {tuple(original_size)}")
    h0, w0 = (int(v) for v in original_size)
    ch, cw = (int(crop_size), int(crop_size)) if isinstance(crop_size, (int, np.integer)) else (int(crop_size[0]), int(crop_size[-1]))
    if min(h0, w0, ch, cw) < 1:
        raise ValueError(f"sizes must be positive, got original {original_size}, crop {crop_size}")
    if resize_size is None:
        h1, w1 = h0, w0
    else:
        # torchvision.transforms.functional.resize with an int: shorter side -> size, longer side truncated
        short, long_ = (h0, w0) if h0 <= w0 else (w0, h0)
        new_short, new_long = int(resize_size), int(int(resize_size) * long_ / short)
        h1, w1 = (new_short, new_long) if h0 <= w0 else (new_long, new_short)
    if ch > h1 or cw > w1:
        raise ValueError(
            f"crop {ch}x{cw} is larger than the resized image {h1}x{w1}: the preprocessing pads, and the map "
            "cannot be mapped back onto the photograph; pass the crop the model really saw"
        )
    top, left = int(round((h1 - ch) / 2.0)), int(round((w1 - cw) / 2.0))
    sy, sx = h0 / h1, w0 / w1
    return (top * sy, left * sx, ch * sy, cw * sx)


def map_to_original(
    heat: Union[Tensor, np.ndarray],
    original_size: Sequence[int],
    resize_size: Optional[int] = None,
    crop_size: Optional[Union[int, Sequence[int]]] = None,
) -> np.ndarray:
    r"""Place a map computed on a resized, centre-cropped input back onto the original image.

    The map is upsampled (bilinear) onto the crop box of :func:`crop_box`; pixels the model never
    saw (outside the crop) are ``NaN``, which :func:`plot_comparison_grid` leaves uncoloured.

    Args:
        heat (Tensor or ndarray): ``(h, w)`` map (``(1, h, w)`` and ``(1, 1, h, w)`` accepted;
                    channels are summed).
        original_size (sequence of int): ``(H, W)`` of the original image.
        resize_size (int, optional): shorter side after resizing; None for none. Default: None
        crop_size (int or sequence of int, optional): centre-crop size; None when the input was
                    the whole (resized) image. Default: None

    Returns:
        ndarray: ``(H, W)`` float64 map, ``NaN`` outside the crop.

    Examples::

        >>> m = map_to_original(maps[0, 0], photo.shape[:2], resize_size=256, crop_size=224)
        >>> m.shape == photo.shape[:2]
        True
    """
    h0, w0 = (int(v) for v in original_size)
    if crop_size is None:
        top, left, bh, bw = 0.0, 0.0, float(h0), float(w0)
    else:
        top, left, bh, bw = crop_box((h0, w0), resize_size, crop_size)
    r0, c0 = int(round(top)), int(round(left))
    r1, c1 = min(h0, int(round(top + bh))), min(w0, int(round(left + bw)))
    t = torch.as_tensor(heat).detach().cpu().double()
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3:
        t = t.sum(0)
    if t.dim() != 2:
        raise ValueError(f"heat must be a 2-D (h, w) map, got shape {tuple(torch.as_tensor(heat).shape)}")
    out = np.full((h0, w0), np.nan)
    out[r0:r1, c0:c1] = resize_maps(t[None, None], (r1 - r0, c1 - c0), "bilinear")[0, 0].numpy()
    return out


# --------------------------------------------------------------------------- publication grid


def _as_display_image(image: Union[Tensor, np.ndarray, Any], mean: Optional[Sequence[float]],
                      std: Optional[Sequence[float]]) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1]: PIL images, uint8 arrays, (C, H, W) tensors (unnormalised)."""
    if not isinstance(image, (Tensor, np.ndarray)):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        image = image.astype(np.float64) / 255.0
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std to undo a normalisation, or neither")
        t = torch.as_tensor(image)
        if t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
        image = unnormalize(t, mean, std)
    img = _image_hwc(image, 0)
    return img


def _cell_values(m: np.ndarray, scale: str) -> np.ndarray:
    if scale != "map":
        return m
    peak = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0
    return m / peak if peak > 0 else np.zeros_like(m)


def plot_comparison_grid(
    images: Union[Sequence[Any], Tensor, np.ndarray],
    maps: Mapping[str, Mapping[str, Union[Tensor, np.ndarray, Sequence[Any]]]],
    path: Optional[Union[str, os.PathLike]] = None,
    captions: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    geometry: Optional[Sequence[Optional[Tuple[Optional[int], Union[int, Sequence[int]]]]]] = None,
    cmap: str = "viridis",
    alpha: float = 0.55,
    scale: str = "map",
    cmap_signed: str = "RdBu_r",
    cell_size: float = 2.2,
    font_size: float = 9.0,
    title: Optional[str] = None,
    dpi: int = 150,
) -> "Figure":
    r"""Publication figure: methods x layers (x images) of maps over the original images, with colour bars.

    One block of rows per image, one row per method, one column per layer; the first column shows
    the image with its caption (e.g. class name and probability). Maps are bilinearly upsampled
    onto the image; with ``geometry`` a map computed on a resized, centre-cropped input is placed
    back on the **uncropped** original (:func:`map_to_original`) and the crop box is outlined,
    pixels the model did not see stay uncoloured. Every row has a colour bar.

    Args:
        images (sequence or Tensor or ndarray): the images, one per block: PIL images, ``(H, W, 3)``
                    arrays (uint8 or floats in ``[0, 1]``), or ``(3, H, W)`` tensors; a batch
                    ``(N, 3, H, W)`` tensor is split. Normalised inputs need ``mean`` and ``std``.
        maps (Mapping): ``maps[method][layer]`` -> maps of the images: an ``(N, C, h, w)`` tensor
                    (channels summed) or a sequence of ``N`` 2-D maps, ``N = len(images)``.
        path (str or PathLike, optional): write the figure there (PNG). Default: None
        captions (sequence of str, optional): one caption per image, e.g. ``"tabby cat (p=0.93)"``.
                    Default: None
        mean (sequence of float, optional): normalisation mean to undo (:func:`unnormalize`).
                    Default: None
        std (sequence of float, optional): normalisation standard deviation to undo. Default: None
        geometry (sequence, optional): per image ``(resize_size, crop_size)`` of the preprocessing
                    that produced the model input from that (original) image, or None for an image
                    that is the model input itself. Default: None
        cmap (str, optional): matplotlib colour map; perceptually uniform by default. Default: ``"viridis"``
        alpha (float, optional): opacity of the map over the image, in ``[0, 1]``. Default: 0.55
        scale (str, optional): ``"map"``: each map divided by its largest magnitude (relative
                    attribution, one ``[0, 1]`` scale, ``[-1, 1]`` for signed maps); ``"row"``: raw
                    values, one range per row (method x image) across layers; ``"shared"``: raw
                    values, one range for the whole figure. Default: ``"map"``
        cmap_signed (str, optional): colour map of the rows (or figure) whose maps take negative
                    values (e.g. gradient x activation), diverging around 0. Default: ``"RdBu_r"``
        cell_size (float, optional): side of one panel in inches. Default: 2.2
        font_size (float, optional): font size in points of labels and colour-bar numbers. Default: 9.0
        title (str, optional): figure title. Default: None
        dpi (int, optional): resolution of the written PNG. Default: 150

    Returns:
        matplotlib.figure.Figure: the figure (Agg canvas, never registered with pyplot).

    Examples::

        >>> t = weights.transforms()
        >>> x = t(photo)[None]
        >>> maps = {"NormGrad": {"layer3": LayerNormGrad(model, model.layer3).attribute(x, target=281)}}
        >>> plot_comparison_grid([photo], maps, "grid.png", captions=["tabby cat (p=0.71)"],
        >>>                      geometry=[(t.resize_size[0], t.crop_size[0])])
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if not maps:
        raise ValueError("maps is empty; give maps[method][layer] -> maps of the images")
    if scale not in ("map", "row", "shared"):
        raise ValueError(f"scale must be 'map', 'row' or 'shared', got {scale!r}")
    check_style(cmap, alpha, cmap_signed)
    if isinstance(images, (Tensor, np.ndarray)) and np.ndim(images) == 4:
        images = list(images)
    elif isinstance(images, (Tensor, np.ndarray)):
        images = [images]
    images = list(images)
    n = len(images)
    if n == 0:
        raise ValueError("images is empty")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images: give one caption per image")
    if geometry is not None and len(geometry) != n:
        raise ValueError(f"{len(geometry)} geometry entries for {n} images: give one (resize, crop) per image")
    methods = list(maps)
    layers: list = []
    for r in methods:
        for c in maps[r]:
            if c not in layers:
                layers.append(c)
    shown = [_as_display_image(im, mean, std) for im in images]

    # every cell's map on its image, as an (H, W) float array (NaN where the model did not look)
    cells: Dict[Tuple[int, str, str], np.ndarray] = {}
    for r in methods:
        for c in maps[r]:
            seq = maps[r][c]
            if isinstance(seq, (Tensor, np.ndarray)) and np.ndim(seq) == 2:
                seq = [seq]
            if len(seq) != n:
                raise ValueError(f"maps[{r!r}][{c!r}] has {len(seq)} maps for {n} images")
            for i in range(n):
                h, w = shown[i].shape[:2]
                if geometry is not None and geometry[i] is not None:
                    resize, crop = geometry[i]
                    m = map_to_original(seq[i], (h, w), resize, crop)
                else:
                    m = map_to_original(seq[i], (h, w))
                cells[(i, r, c)] = _cell_values(m, scale)

    def _range(vals: Sequence[np.ndarray]) -> Tuple[float, float]:
        finite = [v[np.isfinite(v)] for v in vals if np.isfinite(v).any()]
        if not finite:
            return 0.0, 1.0
        lo = min(float(v.min()) for v in finite)
        hi = max(float(v.max()) for v in finite)
        if scale == "map":
            return (-1.0 if lo < 0 else 0.0), 1.0
        if lo < 0 < hi:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    all_range = _range(list(cells.values()))
    nrows, ncols = n * len(methods), 1 + len(layers)
    aspect = max(shown[i].shape[0] / shown[i].shape[1] for i in range(n))
    fig = _new_figure(cell_size * ncols + 1.0, cell_size * aspect * nrows + (0.5 if title else 0.2), constrained=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i in range(n):
        for k, r in enumerate(methods):
            row = i * len(methods) + k
            ax0 = axes[row][0]
            ax0.set_xticks([])
            ax0.set_yticks([])
            if k == 0:
                ax0.imshow(shown[i])
                if captions is not None:
                    ax0.set_title(captions[i], fontsize=font_size)
                elif row == 0:
                    ax0.set_title("image", fontsize=font_size)
            else:
                ax0.axis("off")
            row_vals = [cells[(i, r, c)] for c in layers if (i, r, c) in cells]
            if scale == "shared":
                lo, hi = all_range
            else:
                lo, hi = _range(row_vals)
            norm = Normalize(vmin=lo, vmax=hi)
            cm = colormaps[cmap_signed if (all_range if scale == "shared" else (lo, hi))[0] < 0 else cmap]
            for j, c in enumerate(layers):
                ax = axes[row][j + 1]
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(c, fontsize=font_size)
                if j == 0:
                    ax.set_ylabel(r, fontsize=font_size)
                if (i, r, c) not in cells:
                    ax.imshow(np.ones_like(shown[i]) * 0.92)
                    ax.text(0.5, 0.5, "no map", ha="center", va="center", transform=ax.transAxes, fontsize=font_size)
                    continue
                m = cells[(i, r, c)]
                ax.imshow(shown[i])
                ax.imshow(np.ma.masked_invalid(m), cmap=cm, norm=norm, alpha=float(alpha), interpolation="bilinear")
                if not np.all(np.isfinite(m)):
                    rows_in = np.where(np.isfinite(m).any(1))[0]
                    cols_in = np.where(np.isfinite(m).any(0))[0]
                    ax.add_patch(Rectangle((cols_in[0] - 0.5, rows_in[0] - 0.5), cols_in[-1] - cols_in[0] + 1,
                                           rows_in[-1] - rows_in[0] + 1, fill=False, ec="white", lw=1.0, ls="--"))
                if not np.any(np.nan_to_num(m)):
                    ax.text(0.5, 0.06, "zero map", ha="center", va="bottom", transform=ax.transAxes,
                            fontsize=font_size * 0.9, color="white")
            if scale != "shared":
                cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cm), ax=list(axes[row][1:]), fraction=0.04,
                                  pad=0.02, aspect=12)
                cb.ax.tick_params(labelsize=font_size * 0.9)
                if scale == "map":
                    cb.set_label("map / max |map|", fontsize=font_size * 0.9)
    if scale == "shared":
        cb = fig.colorbar(ScalarMappable(norm=Normalize(*all_range), cmap=cm), ax=list(axes[:, 1:].flat),
                          fraction=0.04, pad=0.02, aspect=30)
        cb.ax.tick_params(labelsize=font_size * 0.9)
        cb.set_label("attribution", fontsize=font_size)
    if title:
        fig.suptitle(title, fontsize=font_size * 1.2)
    if path is not None:
        save_figure(fig, path, dpi)
    return fig


def overlay_map(
    image: Union[Tensor, np.ndarray, Any],
    heat: Union[Tensor, np.ndarray],
    geometry: Optional[Tuple[Optional[int], Union[int, Sequence[int]]]] = None,
    cmap: str = "viridis",
    alpha: float = 0.55,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dim_outside: float = 0.45,
    cmap_signed: str = "RdBu_r",
) -> np.ndarray:
    r"""A map blended over the (unnormalised, uncropped) image, as an ``(H, W, 3)`` array in ``[0, 1]``.

    The map is divided by its largest magnitude (``[0, 1]``; a signed map ``[-1, 1]`` is drawn with
    the diverging ``cmap_signed``, 0 at its centre), placed on the image with :func:`map_to_original` and blended
    with opacity ``alpha``; pixels outside the model's crop are darkened by ``dim_outside``.

    Args:
        image (Tensor or ndarray or PIL.Image.Image): the image (see :func:`plot_comparison_grid`).
        heat (Tensor or ndarray): ``(h, w)`` map.
        geometry (tuple, optional): ``(resize_size, crop_size)`` of the preprocessing that made the
                    model input from ``image``; None when ``image`` is the model input. Default: None
        cmap (str, optional): matplotlib colour map. Default: ``"viridis"``
        alpha (float, optional): opacity of the map. Default: 0.55
        mean (sequence of float, optional): normalisation mean to undo. Default: None
        std (sequence of float, optional): normalisation std to undo. Default: None
        dim_outside (float, optional): darkening of pixels the model did not see, in ``[0, 1]``.
                    Default: 0.45
        cmap_signed (str, optional): colour map of maps with negative values. Default: ``"RdBu_r"``

    Returns:
        ndarray: ``(H, W, 3)`` float array in ``[0, 1]``.

    Examples::

        >>> rgb = overlay_map(photo, maps[0, 0], geometry=(256, 224))
        >>> PIL.Image.fromarray((rgb * 255).round().astype("uint8")).save("overlay.png")
    """
    from matplotlib import colormaps

    check_style(cmap, alpha, cmap_signed)
    img = _as_display_image(image, mean, std)
    h, w = img.shape[:2]
    m = map_to_original(heat, (h, w), *(geometry if geometry is not None else (None, None)))
    m = _cell_values(m, "map")
    inside = np.isfinite(m)
    cm = colormaps[cmap]
    if np.nanmin(np.where(inside, m, 0.0)) < 0:
        m, cm = (m + 1.0) / 2.0, colormaps[cmap_signed]
    rgb = cm(np.nan_to_num(m).clip(0, 1))[..., :3]
    out = np.where(inside[..., None], (1 - alpha) * img + alpha * rgb, img * (1 - dim_outside))
    return out.clip(0, 1)


# --------------------------------------------------------------------------- sanity-check plots


def plot_randomization(
    result: "RandomizationResult",
    path: Optional[Union[str, os.PathLike]] = None,
    measures: Optional[Sequence[str]] = None,
    dpi: int = 100,
) -> "Figure":
    r"""Similarity to the original map vs randomised depth (mean over samples, with min-max band).

    Args:
        result (RandomizationResult): from :func:`captum_normgrad.evaluation.model_parameter_randomization`.
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

    Maps are shown as ``[0, 1]`` absolute maps (:func:`captum_normgrad.evaluation.normalize_abs`).

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
    from .evaluation.similarity import normalize_abs

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
