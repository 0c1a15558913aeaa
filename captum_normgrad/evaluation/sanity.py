r"""Sanity checks for any Captum layer attribution: model parameter randomization and class sensitivity.

**Model parameter randomization** (Adebayo et al., "Sanity checks for saliency maps", 2018):
modules are re-initialised top-down (output side first), either *cascading* (cumulatively) or
*independent* (one at a time), always on deep copies of the model, so the caller's model is never
touched. Each randomised model explains its **own** argmax class, and its map is compared with the
original model's map by the four measures of the paper, reported as Spearman's rho or SSIM values
(never p-values):

* ``"spearman_abs"``: Spearman rank correlation of the absolute maps (channel-summed, clipped at
  their 99th percentile and scaled to ``[0, 1]``);
* ``"spearman"``: Spearman rank correlation of the signed maps (channel-summed);
* ``"ssim"``: structural similarity of the ``[0, 1]`` absolute maps (:mod:`skimage.metrics`);
* ``"hog_spearman"``: Spearman rank correlation of the HOG features of the ``[0, 1]`` absolute maps
  (:func:`skimage.feature.hog`).

A method that passes the check gives maps that change (low similarity) when the weights it
explains are destroyed. A Spearman rho is undefined (NaN) when one of the two maps is constant,
e.g. an all-zero Grad-CAM map; NaNs are ignored by :meth:`RandomizationResult.mean`.

**Class sensitivity** (Khakzar et al.; the NormGrad authors' ``class_selectivity``): the Spearman
rho between the maps explaining the most and the least probable class; lower is more
class-sensitive.

The attribution method is given as a class (or any factory ``method(model, layer, **kwargs)``)
plus a layer *name*: the layer is looked up by name on each copy of the model, so the method always
hooks the copy it explains.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from captum._utils.common import _format_additional_forward_args, _format_tensor_into_tuples, _run_forward
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._layers import module_by_name
from .._maps import reduce_map_channels, resize_maps
from .similarity import MEASURES, map_similarity, normalize_abs, spearman_rho

__all__ = [
    "MEASURES",
    "ClassSensitivityResult",
    "RandomizationResult",
    "class_sensitivity",
    "default_randomization_modules",
    "map_similarity",
    "model_parameter_randomization",
    "normalize_abs",
    "spearman_rho",
]

MethodFactory = Callable[..., Any]
Inputs = Union[Tensor, Tuple[Tensor, ...]]


def _check_method(method: Any) -> None:
    if not callable(method):
        raise TypeError(
            f"method must be an attribution class or factory called as method(model, layer), got "
            f"{type(method).__name__}; e.g. LayerNormGrad or captum.attr.LayerGradCam"
        )


def _method_name(method: Any) -> str:
    return getattr(method, "__name__", type(method).__name__)


def _maps_to_numpy(out: Any, size: Optional[Sequence[int]], interpolate_mode: str) -> np.ndarray:
    if isinstance(out, list):
        raise ValueError(
            "the method returned a list of maps (several layers); give a single layer name to the sanity checks"
        )
    if isinstance(out, tuple):
        if len(out) != 1:
            raise ValueError(f"the layer returned {len(out)} tensors; choose a layer with a single output")
        out = out[0]
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise ValueError(f"expected maps of shape (N, C, *locations), got {getattr(out, 'shape', type(out))}")
    m = reduce_map_channels(out.detach(), "sum")
    if size is not None and m.dim() >= 3:
        m = resize_maps(m.double(), size, interpolate_mode)
    return m[:, 0].double().cpu().numpy()


def _argmax_targets(model: nn.Module, inputs: Tuple[Tensor, ...], add_args: Any) -> List[int]:
    with torch.no_grad():
        out = _run_forward(model, inputs, None, add_args)
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(
            f"the model must return (N, num_classes) scores to pick its argmax class, got "
            f"{getattr(out, 'shape', type(out))}"
        )
    return out.argmax(1).tolist()


def _explain(
    model: nn.Module,
    method: MethodFactory,
    layer: str,
    inputs: Inputs,
    target: Any,
    add_args: Any,
    method_kwargs: Dict[str, Any],
    attribute_kwargs: Dict[str, Any],
    size: Optional[Sequence[int]],
    interpolate_mode: str,
) -> np.ndarray:
    attr = method(model, module_by_name(model, layer), **method_kwargs)
    kw = dict(attribute_kwargs)
    if add_args is not None:
        kw["additional_forward_args"] = add_args
    return _maps_to_numpy(attr.attribute(inputs, target=target, **kw), size, interpolate_mode)


def _target_list(target: Any, n: int) -> List[int]:
    """Explained class of each sample for the record (-1 where it is not a plain class index)."""
    if isinstance(target, Tensor):
        target = target.item() if target.numel() == 1 else target.flatten().tolist()
    if isinstance(target, (int, np.integer)):
        return [int(target)] * n
    if isinstance(target, list) and len(target) == n:
        return [int(t) if isinstance(t, (int, np.integer)) else -1 for t in target]
    return [-1] * n


def default_randomization_modules(model: nn.Module) -> List[str]:
    r"""Names of the modules that own parameters, top-down (output side first).

    The order is the reverse of ``model.named_modules()`` (registration order, which follows the
    forward pass in ``torchvision`` models).

    Args:
        model (torch.nn.Module): the model.

    Returns:
        list[str]: module names.

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        >>>                           torch.nn.LazyLinear(2))
        >>> default_randomization_modules(net)
        ['3', '0']
    """
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if not names and any(True for _ in model.parameters(recurse=False)):
        names = [""]
    return names[::-1]


def _param_modules(model: nn.Module, name: str) -> List[nn.Module]:
    root = module_by_name(model, name)
    mods = [m for m in root.modules() if any(True for _ in m.parameters(recurse=False))]
    if not mods:
        raise ValueError(f"module {name!r} ({type(root).__name__}) has no parameters to randomise; drop it from modules")
    return mods


def _reinitialize(model: nn.Module, name: str, seed: int) -> None:
    """Re-initialise every parameter-owning sub-module of ``model.<name>`` (``reset_parameters``)."""
    mods = _param_modules(model, name)
    devices = sorted({p.device.index or 0 for m in mods for p in m.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for m in mods:
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:  # custom modules without an initialiser
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


# --------------------------------------------------------------------------- randomization


@dataclass
class RandomizationResult:
    r"""Result of :func:`model_parameter_randomization`.

    Attributes:
        mode (str): ``"cascading"`` or ``"independent"``.
        method (str): name of the attribution method.
        layer (str): name of the explained layer.
        modules (list[str]): randomised modules, top-down; step ``i`` randomised ``modules[i]``
                    (and, when cascading, every module before it).
        similarity (dict[str, ndarray]): measure -> ``(len(modules), N)`` values.
        targets (ndarray): ``(len(modules) + 1, N)`` explained classes; row 0 is the original
                    model's argmax, row ``i + 1`` the randomised model's of step ``i``.
        original_maps (ndarray or None): ``(N, *L)`` original maps.
        randomized_maps (ndarray or None): ``(len(modules), N, *L)`` maps of each step.

    Examples::

        >>> res = model_parameter_randomization(net, LayerNormGrad, "conv4", x)
        >>> res.mean()["spearman_abs"]        # one value per randomisation step
        >>> res.rows()[0]                     # {'step': 1, 'module': 'fc', 'spearman_abs': ...}
        >>> plot_randomization(res, "mprt.png")   # captum_normgrad.viz
    """

    mode: str
    method: str
    layer: str
    modules: List[str]
    similarity: Dict[str, np.ndarray]
    targets: np.ndarray
    original_maps: Optional[np.ndarray] = field(default=None, repr=False)
    randomized_maps: Optional[np.ndarray] = field(default=None, repr=False)

    def mean(self) -> Dict[str, np.ndarray]:
        """Mean over samples (NaNs ignored) of each measure: measure -> ``(len(modules),)``."""
        out: Dict[str, np.ndarray] = {}
        for k, v in self.similarity.items():
            with np.errstate(invalid="ignore"):
                finite = np.isfinite(v)
                cnt = finite.sum(1)
                s = np.where(finite, v, 0.0).sum(1)
                out[k] = np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)
        return out

    def rows(self) -> List[Dict[str, Any]]:
        """One row per step: ``{"step", "module", <measure>: mean}``."""
        means = self.mean()
        return [
            {"step": i + 1, "module": name, **{k: float(means[k][i]) for k in self.similarity}}
            for i, name in enumerate(self.modules)
        ]

    def to_markdown(self) -> str:
        """The table of :meth:`rows` as Markdown."""
        keys = list(self.similarity)
        lines = ["| step | randomised module | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in self.rows():
            lines.append(f"| {r['step']} | {r['module']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, measures: Optional[Sequence[str]] = None) -> Any:
        """Deprecated: use :func:`captum_normgrad.viz.plot_randomization(result, ...)
        <captum_normgrad.viz.plot_randomization>` (the evaluation tools do not draw figures; this
        method goes in the next release)."""
        warnings.warn(
            "RandomizationResult.plot is deprecated; use captum_normgrad.viz.plot_randomization(result, path)",
            DeprecationWarning,
            stacklevel=2,
        )
        from ..viz import plot_randomization

        return plot_randomization(self, path=path, measures=measures)


def model_parameter_randomization(
    model: nn.Module,
    method: MethodFactory,
    layer: str,
    inputs: Inputs,
    modules: Optional[Sequence[str]] = None,
    mode: str = "cascading",
    target: Any = None,
    additional_forward_args: Any = None,
    method_kwargs: Optional[Dict[str, Any]] = None,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
    upsample: bool = True,
    interpolate_mode: str = "bilinear",
    seed: int = 0,
    keep_maps: bool = True,
    hog_pixels_per_cell: Optional[int] = None,
    show_progress: bool = False,
) -> RandomizationResult:
    r"""Model parameter randomization test (Adebayo et al.) for any Captum layer attribution.

    Args:
        model (torch.nn.Module): the trained model; never modified (all work is on deep copies).
        method (type or Callable): an attribution class such as ``LayerNormGrad``,
                    ``captum.attr.LayerGradCam`` or ``captum.attr.LayerGradientXActivation``, or
                    any factory called as ``method(model_copy, layer_module, **method_kwargs)``.
        layer (str): name of the explained layer (``dict(model.named_modules())`` key), looked
                    up on each copy.
        inputs (Tensor or tuple[Tensor, ...]): the inputs to explain, ``(N, C, H, W)``.
        modules (sequence of str, optional): modules to randomise, in the order given (top-down:
                    output side first). A module without own parameters randomises all its
                    parameter-owning sub-modules (so ``"layer4"`` is a whole block). ``None``:
                    :func:`default_randomization_modules`. Default: None
        mode (str, optional): ``"cascading"`` (cumulative) or ``"independent"`` (one module at
                    a time). Default: ``"cascading"``
        target (int, list, or Tensor, optional): ``None`` (the paper's protocol) explains each
                    model's own argmax class; otherwise this fixed target for every model.
                    Default: None
        additional_forward_args (Any, optional): extra forward arguments. Default: None
        method_kwargs (dict, optional): keyword arguments of ``method`` (besides model and
                    layer). Default: None
        attribute_kwargs (dict, optional): keyword arguments of ``attribute`` (e.g.
                    ``{"relu_attributions": True}`` for ``LayerGradCam``). Default: None
        upsample (bool, optional): compare maps upsampled to the input size (needed by SSIM and
                    HOG for small layer maps); otherwise at the layer's resolution. Default: True
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``
        seed (int, optional): seed of the re-initialisations (step ``i`` uses ``seed + i``; the
                    caller's RNG state is left untouched). Default: 0
        keep_maps (bool, optional): keep all maps in the result (for plotting). Default: True
        hog_pixels_per_cell (int, optional): see :func:`map_similarity`. Default: None
        show_progress (bool, optional): tqdm progress bar. Default: False

    Returns:
        RandomizationResult: similarities per step and sample, targets, maps.

    Raises:
        ValueError: unknown layer or module name (the valid names are listed), an empty module
                    list, a module without parameters, an unknown mode.

    Examples::

        >>> from captum.attr import LayerGradCam
        >>> res = model_parameter_randomization(net, LayerNormGrad, "conv4", x)
        >>> print(res.to_markdown())
        >>> res_gc = model_parameter_randomization(
        >>>     net, LayerGradCam, "conv4", x, mode="independent",
        >>>     attribute_kwargs={"relu_attributions": True})
    """
    _check_method(method)
    if mode not in ("cascading", "independent"):
        raise ValueError(f"unknown mode {mode!r}; choose 'cascading' or 'independent'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (it is deep-copied and randomised), got {type(model).__name__}")
    module_by_name(model, layer)  # validates the layer name
    if isinstance(modules, str):
        raise TypeError("modules must be a sequence of module names, not a single str; wrap it in a list")
    names = default_randomization_modules(model) if modules is None else list(modules)
    if not names:
        raise ValueError(
            "the list of modules to randomise is empty; give at least one module name (or None for every "
            "module with parameters, top-down)"
        )
    for name in names:
        _param_modules(model, name)  # validates names and that they own parameters
    method_kwargs = dict(method_kwargs or {})
    attribute_kwargs = dict(attribute_kwargs or {})
    inputs_t = _format_tensor_into_tuples(inputs)
    add_args = _format_additional_forward_args(additional_forward_args)
    size = tuple(inputs_t[0].shape[2:]) if upsample else None

    n_inputs = inputs_t[0].shape[0]

    def explain(m: nn.Module) -> Tuple[np.ndarray, List[int]]:
        tgt = _argmax_targets(m, inputs_t, add_args) if target is None else target
        maps = _explain(m, method, layer, inputs, tgt, additional_forward_args, method_kwargs,
                        attribute_kwargs, size, interpolate_mode)
        return maps, _target_list(tgt, n_inputs)

    pristine = copy.deepcopy(model)
    original, t0 = explain(copy.deepcopy(pristine))
    n = original.shape[0]
    sims = {k: np.full((len(names), n), np.nan) for k in MEASURES}
    targets = [t0]
    maps_all: List[np.ndarray] = []
    current = copy.deepcopy(pristine) if mode == "cascading" else None
    for step, name in enumerate(tqdm(names, desc=f"randomising ({mode})", disable=not show_progress)):
        if mode == "cascading":
            work = current
        else:
            work = copy.deepcopy(pristine)
        assert work is not None
        _reinitialize(work, name, seed + step)
        maps, ts = explain(work)
        targets.append(ts)
        if keep_maps:
            maps_all.append(maps)
        for i in range(n):
            for k, v in map_similarity(original[i], maps[i], hog_pixels_per_cell).items():
                sims[k][step, i] = v
    return RandomizationResult(
        mode=mode,
        method=_method_name(method),
        layer=layer,
        modules=names,
        similarity=sims,
        targets=np.asarray(targets, dtype=np.int64),
        original_maps=original if keep_maps else None,
        randomized_maps=np.stack(maps_all) if keep_maps else None,
    )


# --------------------------------------------------------------------------- class sensitivity


@dataclass
class ClassSensitivityResult:
    r"""Result of :func:`class_sensitivity`.

    Attributes:
        rho (ndarray): ``(N,)`` Spearman rho between the maps of the most and least probable
                    classes (lower is more class-sensitive; NaN for a constant map).
        top_class (ndarray): ``(N,)`` most probable class.
        bottom_class (ndarray): ``(N,)`` least probable class.
        method (str): method name.
        layer (str): layer name.

    Examples::

        >>> res = class_sensitivity(net, LayerGradCam, "conv4", x)
        >>> res.rho.shape, res.mean()
    """

    rho: np.ndarray
    top_class: np.ndarray
    bottom_class: np.ndarray
    method: str
    layer: str
    top_maps: Optional[np.ndarray] = field(default=None, repr=False)
    bottom_maps: Optional[np.ndarray] = field(default=None, repr=False)

    def mean(self) -> float:
        """Mean rho over samples (NaNs ignored; NaN if all are NaN)."""
        finite = self.rho[np.isfinite(self.rho)]
        return float(finite.mean()) if finite.size else float("nan")


def class_sensitivity(
    model: nn.Module,
    method: MethodFactory,
    layer: str,
    inputs: Inputs,
    additional_forward_args: Any = None,
    method_kwargs: Optional[Dict[str, Any]] = None,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
    upsample: bool = False,
    interpolate_mode: str = "bilinear",
    keep_maps: bool = True,
) -> ClassSensitivityResult:
    r"""Class sensitivity: Spearman rho between the maps of the most and least probable class.

    A class-insensitive method (e.g. one that keeps only positive gradients, or NormGrad order 0,
    which the paper shows is not class-selective) gives nearly the same map for any class: rho
    close to 1. Signed maps are compared as they are (no absolute value).

    Args:
        model (torch.nn.Module): the model (a deep copy is explained; the model is not touched).
        method (type or Callable): attribution class or factory ``method(model, layer, **kw)``.
        layer (str): layer name, looked up on the copy.
        inputs (Tensor or tuple[Tensor, ...]): the inputs.
        additional_forward_args (Any, optional): extra forward arguments. Default: None
        method_kwargs (dict, optional): keyword arguments of ``method``. Default: None
        attribute_kwargs (dict, optional): keyword arguments of ``attribute``. Default: None
        upsample (bool, optional): compare maps upsampled to the input size instead of at the
                    layer's resolution. Default: False
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``
        keep_maps (bool, optional): keep both maps in the result. Default: True

    Returns:
        ClassSensitivityResult: rho per sample and the two classes.

    Examples::

        >>> res = class_sensitivity(net, LayerNormGrad, "conv4", x)
        >>> res.rho, res.mean()
    """
    _check_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    module_by_name(model, layer)
    work = copy.deepcopy(model)
    inputs_t = _format_tensor_into_tuples(inputs)
    add_args = _format_additional_forward_args(additional_forward_args)
    with torch.no_grad():
        out = _run_forward(work, inputs_t, None, add_args)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(
            f"class sensitivity needs (N, num_classes >= 2) scores from the model, got {getattr(out, 'shape', type(out))}"
        )
    probs = torch.softmax(out.double(), dim=1)
    top = probs.argmax(1).tolist()
    bottom = probs.argmin(1).tolist()
    size = tuple(inputs_t[0].shape[2:]) if upsample else None
    mk, ak = dict(method_kwargs or {}), dict(attribute_kwargs or {})
    m_top = _explain(work, method, layer, inputs, top, additional_forward_args, mk, ak, size, interpolate_mode)
    m_bot = _explain(work, method, layer, inputs, bottom, additional_forward_args, mk, ak, size, interpolate_mode)
    rho = np.array([spearman_rho(a, b) for a, b in zip(m_top, m_bot)])
    return ClassSensitivityResult(
        rho=rho,
        top_class=np.asarray(top),
        bottom_class=np.asarray(bottom),
        method=_method_name(method),
        layer=layer,
        top_maps=m_top if keep_maps else None,
        bottom_maps=m_bot if keep_maps else None,
    )
