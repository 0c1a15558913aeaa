r"""Attribution wrappers: any Captum *layer* attribution made usable by Captum's metrics and NoiseTunnel.

Layer maps have the shape of a layer, ``(N, 1, h, w)`` for NormGrad and Grad-CAM or
``(N, C_l, h, w)`` for :class:`captum.attr.LayerGradientXActivation`, and the form of the layer's
output (a bare tensor even for tuple inputs). :func:`captum.metrics.infidelity` needs attributions
shaped like the input, and :func:`captum.metrics.sensitivity_max` iterates over whatever the
explanation function returns: a bare ``(N, 1, h, w)`` tensor returned for tuple inputs is iterated
row by row, which crashes for ``N > 1`` and is silently wrong for ``N = 1`` (every perturbed map is
compared with the unperturbed one ``n_perturb_samples`` times, inflating the score by
``sqrt(n_perturb_samples)``).

* :func:`upsample_to_input` turns layer maps into input-shaped attributions (upsample, sum
  channels, broadcast over input channels) returned in the same tuple/tensor form as the inputs.
* :func:`as_input_attribution` wraps any attribution method (ours or Captum's) into an
  :class:`InputAttribution`, usable as ``explanation_func`` of ``sensitivity_max``, to produce the
  ``attributions`` of ``infidelity``, and inside :class:`captum.attr.NoiseTunnel`.
* :class:`LayerNoiseTunnel` is :class:`captum.attr.NoiseTunnel` that also accepts layer methods
  given a *list* of layers (they return a list, which ``NoiseTunnel`` rejects). For a single layer
  Captum's own ``NoiseTunnel`` already works unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from captum.attr import Attribution, GradientAttribution, NoiseTunnel
from captum.log import log_usage
from torch import Tensor, nn

from ._maps import reduce_map_channels, resize_maps

__all__ = [
    "InputAttribution",
    "LayerNoiseTunnel",
    "as_input_attribution",
    "upsample_to_input",
]

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]


# --------------------------------------------------------------------------- map shapes


def _upsample_one(
    m: Tensor, inp: Tensor, index: int, interpolate_mode: str, reduce_channels: Optional[str]
) -> Tensor:
    if not isinstance(m, Tensor):
        raise TypeError(f"attribution {index} is a {type(m).__name__}, not a Tensor")
    if not isinstance(inp, Tensor):
        raise TypeError(f"inputs[{index}] is a {type(inp).__name__}, not a Tensor")
    if m.shape[0] != inp.shape[0]:
        raise ValueError(
            f"batch sizes differ: the map has {m.shape[0]} samples but inputs[{index}] has {inp.shape[0]}; "
            "compute the maps on the same inputs you pass here"
        )
    if m.shape == inp.shape:  # already input-shaped (e.g. Saliency, IntegratedGradients)
        return m
    if m.dim() < 3:
        raise ValueError(
            f"a map of shape {tuple(m.shape)} has no spatial locations (a layer with output (N, D)?); "
            "choose a layer with spatial outputs (N, C, H, W) to compare with the input"
        )
    if inp.dim() != m.dim():
        raise ValueError(
            f"the map {tuple(m.shape)} and inputs[{index}] {tuple(inp.shape)} have different numbers of "
            "dims; input-shaped attributions need channels-first inputs (N, C, *locations) with as many "
            "location dims as the layer map"
        )
    m1 = reduce_map_channels(m, reduce_channels)
    up = resize_maps(m1, inp.shape[2:], interpolate_mode)
    if inp.is_floating_point():
        up = up.to(inp.dtype)
    return up.expand(-1, inp.shape[1], *([-1] * (inp.dim() - 2))).contiguous()


def upsample_to_input(
    maps: TensorOrTuple,
    inputs: TensorOrTuple,
    interpolate_mode: str = "bilinear",
    reduce_channels: Optional[str] = "sum",
) -> TensorOrTuple:
    r"""Turn layer maps into attributions shaped like the inputs, in the inputs' own form.

    Each map ``(N, C_l, *L)`` is reduced to one channel (``reduce_channels``), interpolated to the
    locations of the input tensor and repeated over the input's channels, so that
    ``attributions[i].shape == inputs[i].shape``. The result is a tuple exactly when ``inputs`` is
    a tuple. A single map is used for every input tensor; a tuple of maps (a layer that returns
    several tensors) is paired with the inputs one to one. Maps that already have the input's
    shape are returned unchanged.

    Args:
        maps (Tensor or tuple[Tensor, ...]): layer maps, ``(N, C_l, *L)``.
        inputs (Tensor or tuple[Tensor, ...]): the inputs the maps were computed for,
                    channels-first ``(N, C, *S)`` with as many location dims as the maps.
        interpolate_mode (str, optional): ``torch.nn.functional.interpolate`` mode; the linear
                    family is adapted to the number of location dims (``"bilinear"`` on 1-D
                    signals is ``"linear"``).
                    Default: ``"bilinear"``
        reduce_channels (str or None, optional): see :func:`reduce_map_channels`.
                    Default: ``"sum"``

    Returns:
        Tensor or tuple[Tensor, ...]: input-shaped attributions, contiguous, in the form of
        ``inputs``.

    Raises:
        ValueError: batch sizes differ, the map has no location dims, the numbers of maps and
                    inputs differ, or several layers' maps (a list) are given.

    Examples::

        >>> x = torch.rand(2, 3, 32, 32)
        >>> maps = torch.rand(2, 1, 8, 8)
        >>> upsample_to_input(maps, x).shape
        torch.Size([2, 3, 32, 32])
        >>> type(upsample_to_input(maps, (x,)))
        <class 'tuple'>
    """
    if isinstance(maps, list):
        raise ValueError(
            f"got a list of {len(maps)} maps (one per layer); combine them into one map first, e.g. "
            "captum_normgrad.fuse_maps(maps), or pass combine=fuse_maps to as_input_attribution"
        )
    is_tuple = isinstance(inputs, tuple)
    inputs_t: Tuple[Tensor, ...] = inputs if is_tuple else (inputs,)  # type: ignore[assignment]
    if len(inputs_t) == 0:
        raise ValueError("inputs is an empty tuple; give at least one input tensor")
    maps_t: Tuple[Tensor, ...] = maps if isinstance(maps, tuple) else (maps,)  # type: ignore[assignment]
    if len(maps_t) == 1:
        maps_t = maps_t * len(inputs_t)
    elif len(maps_t) != len(inputs_t):
        raise ValueError(
            f"got {len(maps_t)} maps for {len(inputs_t)} input tensors; give one map for all inputs or "
            "one map per input tensor"
        )
    out = tuple(
        _upsample_one(m, inp, i, interpolate_mode, reduce_channels) for i, (m, inp) in enumerate(zip(maps_t, inputs_t))
    )
    return out if is_tuple else out[0]


# --------------------------------------------------------------------------- wrappers


class InputAttribution(Attribution):
    r"""Any attribution method, with its maps returned shaped like the inputs.

    Calling the object (or its :meth:`attribute`) runs the wrapped method's ``attribute`` and
    passes the result through :func:`upsample_to_input`, so a layer method behaves like an input
    attribution method for :func:`captum.metrics.infidelity`,
    :func:`captum.metrics.sensitivity_max` and :class:`captum.attr.NoiseTunnel`, for any batch
    size and for tensor or tuple inputs. Build it with :func:`as_input_attribution`.

    Attributes:
        attribution_method (Attribution): the wrapped method.
        attribute_kwargs (dict): defaults given to every ``attribute`` call (call-time keyword
                    arguments win).

    Examples::

        >>> explain = InputAttribution(LayerGradCam(net, net.conv4), relu_attributions=True)
        >>> explain(torch.rand(2, 3, 32, 32), target=3).shape
        torch.Size([2, 3, 32, 32])
        >>> smooth = NoiseTunnel(explain).attribute(x, nt_samples=8, stdevs=0.1, target=3)
    """

    def __init__(
        self,
        attribution_method: Attribution,
        interpolate_mode: str = "bilinear",
        reduce_channels: Optional[str] = "sum",
        combine: Optional[Callable[[List[Tensor]], Tensor]] = None,
        **attribute_kwargs: Any,
    ) -> None:
        r"""
        Args:

            attribution_method (Attribution): any Captum attribution object with an
                        ``attribute(inputs, ...)`` method, e.g. ``LayerNormGrad(model,
                        model.layer2)`` or ``LayerGradCam(model, model.layer4)``.
            interpolate_mode (str, optional): see :func:`upsample_to_input`.
                        Default: ``"bilinear"``
            reduce_channels (str or None, optional): see :func:`reduce_map_channels`.
                        Default: ``"sum"``
            combine (Callable, optional): turns a list of maps (a method built with a list of
                        layers) into one map, e.g. :func:`captum_normgrad.fuse_maps`. Without it
                        a list raises ``ValueError``.
                        Default: None
            **attribute_kwargs: default keyword arguments of ``attribute`` (e.g.
                        ``relu_attributions=True`` for ``LayerGradCam``).
        """
        if not callable(getattr(attribution_method, "attribute", None)):
            raise TypeError(
                f"attribution_method must be a Captum attribution object with an attribute() method, got "
                f"{type(attribution_method).__name__}; e.g. LayerNormGrad(model, model.layer2)"
            )
        if reduce_channels not in ("sum", "mean", None):
            raise ValueError(f"unknown reduce_channels {reduce_channels!r}; choose 'sum', 'mean' or None")
        self.attribution_method = attribution_method
        self.interpolate_mode = interpolate_mode
        self.reduce_channels = reduce_channels
        self.combine = combine
        self.attribute_kwargs = dict(attribute_kwargs)
        Attribution.__init__(self, attribution_method.forward_func)

    @log_usage()
    def attribute(self, inputs: TensorOrTuple, **kwargs: Any) -> TensorOrTuple:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): the inputs, as for the wrapped method.
            **kwargs: keyword arguments of the wrapped method's ``attribute`` (``target``,
                        ``additional_forward_args``, ...), merged over the defaults.

        Returns:
            *Tensor* or *tuple[Tensor, ...]*:
            - **attributions**: input-shaped attributions, a tuple exactly when ``inputs`` is a
                        tuple.

        Examples::

            >>> explain = as_input_attribution(LayerNormGrad(net, net.conv4))
            >>> explain(torch.rand(2, 3, 32, 32), target=3).shape
            torch.Size([2, 3, 32, 32])
        """
        merged = {**self.attribute_kwargs, **kwargs}
        maps = self.attribution_method.attribute(inputs, **merged)
        if isinstance(maps, list):
            if self.combine is None:
                raise ValueError(
                    f"the method returned a list of {len(maps)} maps (one per layer); pass "
                    "combine=captum_normgrad.fuse_maps (or another function of the list) to "
                    "as_input_attribution, or build the method with a single layer"
                )
            maps = self.combine(maps)
        return upsample_to_input(maps, inputs, self.interpolate_mode, self.reduce_channels)

    def __call__(self, inputs: TensorOrTuple, **kwargs: Any) -> TensorOrTuple:
        return self.attribute(inputs, **kwargs)

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return bool(getattr(self.attribution_method, "multiplies_by_inputs", False))


def as_input_attribution(
    attribution_method: Attribution,
    interpolate_mode: str = "bilinear",
    reduce_channels: Optional[str] = "sum",
    combine: Optional[Callable[[List[Tensor]], Tensor]] = None,
    **attribute_kwargs: Any,
) -> InputAttribution:
    r"""Wrap a (layer) attribution method so that it returns input-shaped attributions.

    The result is callable as ``explain(inputs, **kwargs)`` and is itself a Captum
    ``Attribution``. It returns the same tuple/tensor form it is given, which
    :func:`captum.metrics.sensitivity_max` relies on (it first calls the explanation function with
    a tuple, then with a bare tensor for single-input models).

    Args:
        attribution_method (Attribution): e.g. ``LayerNormGrad(model, model.layer2)``,
                    ``LayerGradCam(model, model.layer4)``, ``LayerGradientXActivation(model,
                    model.layer3)`` or ``LayerNormGradOrder1(model, model.layer2)``.
        interpolate_mode (str, optional): see :func:`upsample_to_input`. Default: ``"bilinear"``
        reduce_channels (str or None, optional): see :func:`reduce_map_channels`. Default: ``"sum"``
        combine (Callable, optional): reduces a list of maps (several layers) to one map, e.g.
                    :func:`captum_normgrad.fuse_maps`. Default: None
        **attribute_kwargs: default keyword arguments for every ``attribute`` call.

    Returns:
        InputAttribution: the wrapped method.

    Examples::

        >>> from captum.metrics import infidelity, sensitivity_max
        >>> explain = as_input_attribution(LayerNormGrad(net, net.conv4))
        >>> x = torch.rand(4, 3, 32, 32)
        >>> sens = sensitivity_max(explain, x, target=3)              # (4,)
        >>> attr = explain(x, target=3)                               # (4, 3, 32, 32)
        >>> def perturb(inputs):
        >>>     noise = 0.01 * torch.randn_like(inputs)
        >>>     return noise, inputs - noise
        >>> infid = infidelity(net, perturb, x, attr, target=3)       # (4,)
    """
    return InputAttribution(attribution_method, interpolate_mode, reduce_channels, combine, **attribute_kwargs)


class _FlatLayers(Attribution):
    """Presents a method that returns a list of layer maps as one returning a flat tuple."""

    def __init__(self, attribution_method: Attribution) -> None:
        self.attribution_method = attribution_method
        self.structure: Optional[List[int]] = None  # per list entry: 0 = tensor, k = tuple of k
        Attribution.__init__(self, attribution_method.forward_func)

    @log_usage()
    def attribute(self, inputs: TensorOrTuple, **kwargs: Any) -> Any:
        out = self.attribution_method.attribute(inputs, **kwargs)
        if not isinstance(out, list):
            self.structure = None
            return out
        if len(out) == 0:
            raise ValueError("the attribution method returned an empty list of maps")
        structure: List[int] = []
        flat: List[Tensor] = []
        for item in out:
            if isinstance(item, tuple):
                structure.append(len(item))
                flat.extend(item)
            else:
                structure.append(0)
                flat.append(item)
        self.structure = structure
        return tuple(flat)

    def unflatten(self, result: Any) -> Any:
        if self.structure is None:
            return result
        flat = list(result)
        out: List[Any] = []
        i = 0
        for k in self.structure:
            if k == 0:
                out.append(flat[i])
                i += 1
            else:
                out.append(tuple(flat[i : i + k]))
                i += k
        return out

    def has_convergence_delta(self) -> bool:
        return bool(self.attribution_method.has_convergence_delta())

    @property
    def multiplies_by_inputs(self) -> bool:
        return bool(getattr(self.attribution_method, "multiplies_by_inputs", False))


class LayerNoiseTunnel(NoiseTunnel):
    r"""
    :class:`captum.attr.NoiseTunnel` (SmoothGrad, SmoothGrad-squared, VarGrad) for layer methods,
    including methods built with a *list* of layers.

    Noise is added to the inputs, the layer maps of every noisy copy are computed and averaged
    per sample: ``E[m(x + eps)]`` for ``"smoothgrad"``, ``E[m^2]`` for ``"smoothgrad_sq"`` and
    ``Var[m]`` for ``"vargrad"``. Captum's own ``NoiseTunnel`` does exactly this for a layer
    method built with one layer (it is used unchanged then); with a list of layers the method
    returns a list, which ``NoiseTunnel`` rejects, so this class presents the list as a tuple to
    ``NoiseTunnel`` and gives the list back. Maps are averaged on the layer grid (no upsampling).
    The call signature is the one of :meth:`captum.attr.NoiseTunnel.attribute`.

    Examples::

        >>> ng = LayerNormGrad(net, [net.conv2, net.conv4])
        >>> smooth = LayerNoiseTunnel(ng).attribute(x, nt_type="smoothgrad", nt_samples=8,
        >>>                                         stdevs=0.1, target=3)
        >>> [m.shape for m in smooth]      # one smoothed map per layer
    """

    def __init__(self, attribution_method: Attribution) -> None:
        r"""
        Args:
            attribution_method (Attribution): any attribution method, e.g.
                        ``LayerNormGrad(model, [model.layer2, model.layer3])``.
        """
        if not callable(getattr(attribution_method, "attribute", None)):
            raise TypeError(
                f"attribution_method must be a Captum attribution object, got {type(attribution_method).__name__}"
            )
        self._flat = _FlatLayers(attribution_method)
        NoiseTunnel.__init__(self, self._flat)
        # noisy inputs need requires_grad exactly when the wrapped method is a gradient method
        self.is_gradient_method = isinstance(attribution_method, GradientAttribution)

    def attribute(self, inputs: TensorOrTuple, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        r"""Same arguments and results as :meth:`captum.attr.NoiseTunnel.attribute`, except that a
        method built with a list of layers gives a list of smoothed maps.

        Examples::

            >>> LayerNoiseTunnel(LayerNormGrad(net, [net.conv2, net.conv4])).attribute(
            >>>     x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=0)
        """
        out = NoiseTunnel.attribute(self, inputs, *args, **kwargs)
        if self._flat.structure is None:
            return out
        if isinstance(out, tuple) and len(out) == 2 and kwargs.get("return_convergence_delta"):
            return self._flat.unflatten(out[0]), out[1]
        return self._flat.unflatten(out)
