r"""Every named attribution method of the package, once.

The front ends (``captum-normgrad explain``, the dataset runner ``captum-normgrad run``, the demo
and the benchmark scripts) offer methods by *name*. This module is the only place where a name is
given a meaning: which class computes it, with which ``attribute()`` defaults, which options a user
may change, whether one object handles a list of layers in one pass, and whether the map has one
channel or one per channel of the layer.

Naming convention: lower case words joined by ``_``; a name says its variant (``gradcam`` is
Captum's :class:`~captum.attr.LayerGradCam` as Captum defines it, *without* the ReLU;
``gradcam_relu`` applies the ReLU of Selvaraju et al.). Names of earlier releases are accepted as
aliases for one release, with a :class:`FutureWarning` (see :data:`ALIASES`).

Adding a method is one :class:`MethodEntry` in :data:`METHODS` plus its line in the registry test
(``tests/test_registry.py`` checks every name against a direct call of its class).

Examples::

    >>> from captum_normgrad.registry import get_method
    >>> entry = get_method("normgrad_selective")
    >>> entry.defaults
    {'virtual_layer': 'scaling', 'aggregation': 'filter_norm'}
    >>> maps = entry.build(model, [model.layer2, model.layer3]).attribute(x, target=y)
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported where it is used, so that `captum-normgrad --help` stays fast
    from torch import nn

__all__ = [
    "MethodEntry",
    "BoundMethod",
    "METHODS",
    "ALIASES",
    "method_names",
    "get_method",
    "canonical_name",
    "method_from_spec",
]

_ORDER0 = "captum_normgrad.normgrad:LayerNormGrad"
_ORDER1 = "captum_normgrad.normgrad_order1:LayerNormGradOrder1"
_ORDER0_OPTIONS = ("virtual_layer", "aggregation", "loss_fn", "weights_grid", "channel_dim", "attribute_to_layer_input")
_ORDER1_OPTIONS = (
    "epsilon", "hessian", "h", "virtual_layer", "aggregation", "weights_grid", "channel_dim", "chunk_size",
    "compute_dtype", "strategy", "attribute_to_layer_input",
)


@dataclass(frozen=True)
class MethodEntry:
    r"""A named attribution method.

    Attributes:
        name (str): the name used by every front end (``--method``, ``method = "..."`` in a run
                    configuration, the benchmarks).
        summary (str): one line for ``--help``.
        formula (str): what the map is, per location of the layer (the variant, in words and symbols).
        factory (str): ``"package.module:Class"``, a Captum layer-attribution class taking
                    ``(forward_func, layer or list of layers, **init_kwargs)``.
        defaults (dict): ``attribute()`` keyword arguments that define the variant.
        options (tuple[str, ...]): ``attribute()`` keywords a user may set (front ends that take
                    global options, like ``explain --epsilon``, pass only these).
        multi_layer (bool): one object explains a list of layers in one pass.
        per_channel (bool): the map has one channel per channel of the layer (``(N, C, *L)``),
                    not one (``(N, 1, *L)``).
        order (int): 0 (one forward and backward pass) or 1 (per-sample training step: costly).
        label (str): a short label for figures and tables.
    """

    name: str
    summary: str
    formula: str
    factory: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Tuple[str, ...] = ()
    multi_layer: bool = False
    per_channel: bool = False
    order: int = 0
    label: str = ""

    def attribution_class(self) -> Any:
        """Import and return the class named by :attr:`factory`."""
        mod_name, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"method {self.name!r} needs {mod_name}, which cannot be imported here ({e})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"method {self.name!r}: module {mod_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        return obj

    def build(
        self,
        forward_func: Any,
        layers: Sequence["nn.Module"],
        init_kwargs: Optional[Mapping[str, Any]] = None,
        cls: Any = None,
    ) -> "BoundMethod":
        r"""The method bound to a model and its layers.

        Args:
            forward_func (nn.Module or callable): the model.
            layers (sequence of nn.Module): the layers to explain (one map per layer).
            init_kwargs (dict, optional): constructor keyword arguments of the class. Default: None
            cls (type, optional): the class, already imported (e.g. from a user's file); Default:
                        None (:meth:`attribution_class`)

        Returns:
            BoundMethod
        """
        return BoundMethod(self, forward_func, list(layers), dict(init_kwargs or {}), cls)


class BoundMethod:
    r"""A :class:`MethodEntry` bound to a model and layers: ``attribute(x, target) -> [map per layer]``.

    Constructed once (the attribution objects are built here) and called per batch.
    """

    def __init__(
        self,
        entry: MethodEntry,
        forward_func: Any,
        layers: List["nn.Module"],
        init_kwargs: Dict[str, Any],
        cls: Any = None,
    ) -> None:
        if not layers:
            raise ValueError(f"method {entry.name!r}: no layer given; pass at least one layer")
        self.entry = entry
        self.n_layers = len(layers)
        cls = entry.attribution_class() if cls is None else cls
        if entry.multi_layer:
            self._objs = [cls(forward_func, list(layers), **init_kwargs)]
        else:
            self._objs = [cls(forward_func, layer, **init_kwargs) for layer in layers]

    def attribute(self, inputs: Any, target: Any = None, **options: Any) -> List[Any]:
        r"""One map per layer (detached), in the order of the layers.

        Args:
            inputs (Tensor or tuple of Tensor): the model's inputs.
            target (int, tuple, Tensor or list, optional): Captum's target forms. Default: None
            **options: ``attribute()`` keywords overriding the entry's defaults (``None`` values
                    are dropped, so front ends can pass unset options as is).

        Returns:
            list: per layer, a Tensor (or what the class returns for a layer with several outputs).
        """
        kwargs = {**self.entry.defaults, **{k: v for k, v in options.items() if v is not None}}
        if self.entry.multi_layer:
            res = self._objs[0].attribute(inputs, target=target, **kwargs)
            per_layer = list(res) if self.n_layers > 1 or isinstance(res, list) else [res]
        else:
            per_layer = [o.attribute(inputs, target=target, **kwargs) for o in self._objs]
        return [_detach(r) for r in per_layer]


def _detach(r: Any) -> Any:
    from torch import Tensor

    if isinstance(r, Tensor):
        return r.detach()
    if isinstance(r, (tuple, list)):
        return type(r)(_detach(t) for t in r)
    return r


METHODS: Dict[str, MethodEntry] = {
    e.name: e
    for e in [
        MethodEntry(
            "normgrad", "NormGrad order 0 (1x1 identity virtual layer, norm aggregation)",
            "||x_u|| * ||dy/dx_u|| per location u (conv1x1 virtual layer, norm aggregation)",
            _ORDER0, {}, _ORDER0_OPTIONS, multi_layer=True, label="NormGrad",
        ),
        MethodEntry(
            "normgrad_selective", "NormGrad selective (scaling virtual layer, filter_norm aggregation)",
            "||max(x_u * dy/dx_u, 0)|| per location u (scaling virtual layer, filter_norm aggregation)",
            _ORDER0, {"virtual_layer": "scaling", "aggregation": "filter_norm"}, _ORDER0_OPTIONS,
            multi_layer=True, label="NormGrad selective",
        ),
        MethodEntry(
            "normgrad_weights", "NormGrad on the layer's own weights (weights virtual layer, norm aggregation)",
            "||dW_u||: norm of the layer's own weight-gradient contribution at location u (weights virtual layer)",
            _ORDER0, {"virtual_layer": "weights"}, _ORDER0_OPTIONS, multi_layer=True, label="NormGrad weights",
        ),
        MethodEntry(
            "normgrad_order1", "NormGrad order 1: training-specific map after one inner SGD step",
            "per-location norms of d/dtheta L(theta - eps * grad L(theta)): post-step gradient minus eps * Hessian-vector term (finite differences), eps = 5e-4",
            _ORDER1, {}, _ORDER1_OPTIONS, multi_layer=True, order=1, label="Order 1",
        ),
        MethodEntry(
            "normgrad_order1_adversarial", "NormGrad order 1, adversarial step: locations that degrade the model",
            "as normgrad_order1 with the ascent step theta + eps * grad L(theta) (adversarial)",
            _ORDER1, {"adversarial": True}, _ORDER1_OPTIONS, multi_layer=True, order=1, label="Order 1 adv.",
        ),
        MethodEntry(
            "normgrad_lookahead", "order 0 on the weights after one SGD step (order 1 without the Hessian term)",
            "order-0 map of the post-step gradient grad L(theta - eps * grad L(theta)) only (hessian='none': no Hessian term)",
            _ORDER1, {"hessian": "none"}, _ORDER1_OPTIONS, multi_layer=True, order=1, label="Lookahead",
        ),
        MethodEntry(
            "gradcam", "Grad-CAM as Captum defines it (LayerGradCam, no ReLU: signed map)",
            "sum_c mean_u(dy/dA_c) * A_c per location (captum LayerGradCam, relu_attributions=False)",
            "captum.attr:LayerGradCam", {}, ("relu_attributions", "attr_dim_summation", "attribute_to_layer_input"),
            label="Grad-CAM (signed)",
        ),
        MethodEntry(
            "gradcam_relu", "Grad-CAM with the ReLU of Selvaraju et al. (LayerGradCam, relu_attributions=True)",
            "max(0, sum_c mean_u(dy/dA_c) * A_c) per location (captum LayerGradCam, relu_attributions=True)",
            "captum.attr:LayerGradCam", {"relu_attributions": True},
            ("attr_dim_summation", "attribute_to_layer_input"), label="Grad-CAM",
        ),
        MethodEntry(
            "gradxact", "gradient x activation per channel (captum LayerGradientXActivation, as Captum returns it)",
            "A_c * dy/dA_c per channel c and location (captum LayerGradientXActivation): (N, C, *L)",
            "captum.attr:LayerGradientXActivation", {}, ("attribute_to_layer_input",),
            per_channel=True, label="Grad x act. (per channel)",
        ),
        MethodEntry(
            "gradxact_sum", "gradient x activation summed over channels (NormGrad scaling virtual layer, sum)",
            "sum_c A_c * dy/dA_c per location (scaling virtual layer, sum aggregation): (N, 1, *L)",
            _ORDER0, {"virtual_layer": "scaling", "aggregation": "sum"}, ("loss_fn", "channel_dim", "attribute_to_layer_input"),
            multi_layer=True, label="Grad x act.",
        ),
    ]
}

#: Names of earlier releases -> the registry name that computes the same map (kept one release).
ALIASES: Dict[str, str] = {
    "normgrad-selective": "normgrad_selective",
    "normgrad1": "normgrad_order1",
    "normgrad1-adv": "normgrad_order1_adversarial",
    "normgrad1-lookahead": "normgrad_lookahead",
}


def method_names() -> List[str]:
    """The names in :data:`METHODS`, in registry order (aliases excluded)."""
    return list(METHODS)


def canonical_name(name: str, warn: bool = True) -> str:
    r"""The registry name for ``name`` (itself, or the target of a deprecated alias).

    Raises:
        ValueError: unknown name (the message lists the names and the closest ones).
    """
    if name in METHODS:
        return name
    if name in ALIASES:
        new = ALIASES[name]
        if warn:
            warnings.warn(
                f"method name {name!r} is deprecated and will be removed in the next release: use {new!r}",
                FutureWarning,
                stacklevel=3,
            )
        return new
    import difflib

    close = difflib.get_close_matches(name, list(METHODS) + list(ALIASES), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    extra = ""
    if name == "gradxact_channels":
        extra = " (per-channel gradient x activation is 'gradxact')"
    raise ValueError(f"unknown method {name!r}{hint}{extra}; choose among {', '.join(METHODS)}")


def get_method(name: str, warn: bool = True) -> MethodEntry:
    """The :class:`MethodEntry` called ``name`` (deprecated aliases accepted with a FutureWarning)."""
    return METHODS[canonical_name(name, warn=warn)]


def method_from_spec(spec: str) -> MethodEntry:
    r"""A registry name, or ``"package.module:Class"`` for any Captum layer attribution class.

    A class spec gets an entry without defaults; it takes a list of layers in one object when it
    is one of this package's classes (``captum_normgrad.*``), else one object per layer.
    """
    if ":" in spec and spec not in METHODS:
        return MethodEntry(
            spec, f"custom class {spec}", f"{spec}.attribute(...)", spec,
            multi_layer=spec.startswith("captum_normgrad."), label=spec.rsplit(":", 1)[-1],
        )
    return get_method(spec)
