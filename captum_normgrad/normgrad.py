"""NormGrad order 0 as a Captum layer attribution (``LayerNormGrad``)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from captum._utils.common import _format_output, _format_tensor_into_tuples
from captum._utils.typing import TargetType
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor
from torch.nn import Module

from . import _capture, _dispatch

__all__ = ["LayerNormGrad"]

LayerOutput = Union[Tensor, Tuple[Tensor, ...]]


class LayerNormGrad(LayerAttribution, GradientAttribution):
    r"""
    Computes NormGrad (order 0) attributions for a chosen layer.

    NormGrad (Rebuffi et al., 2020) imagines a 1x1 convolution with identity weights inserted at
    the chosen point of the network. Its weight gradient is a sum over locations ``u`` of outer
    products ``g_u x_u^T`` of the activation gradient ``g_u`` and the activation ``x_u``; the map is
    the Frobenius norm of each location's contribution,

    .. math::

        m_u = \|g_u x_u^\top\|_F = \|x_u\|_2 \, \|g_u\|_2 ,

    computed from one forward and one backward pass, on whole minibatches, and non-negative.

    The CVPR-2020 variants are available through ``virtual_layer`` (which virtual layer's parameter
    gradient is decomposed) and ``aggregation`` (how a location's contribution becomes a number):
    ``virtual_layer="scaling", aggregation="filter_norm"`` is "NormGrad selective" and
    ``virtual_layer="scaling", aggregation="sum"`` is gradient x activation summed over channels.
    ``virtual_layer="weights"`` decomposes the hooked ``Conv*d``/``Linear`` layer's own weight
    gradient (general filter shapes, all strides, paddings, dilations and groups).

    By default ``g`` is the gradient of the selected output (``target``), exactly the gradient
    :class:`captum.attr.LayerGradCam` uses, so the two are directly comparable. With ``loss_fn`` the
    gradient of the per-sample loss is used instead (the paper's "gradient of the weights"
    reading). A sample's map never depends on the other samples of the batch.

    Where the gradient is uniform over locations (the input of a global average pooling), Grad-CAM
    is exactly ``max(cos(g_u, x_u), 0) * m_u``.

    More details: https://arxiv.org/abs/2004.02866
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: Union[Module, List[Module]],
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        r"""
        Args:

            forward_func (Callable): The forward function of the model or any
                        modification of it.
            layer (torch.nn.Module or list[torch.nn.Module]): Layer(s) for which
                        attributions are computed. With a list, ``attribute`` returns
                        a list with one map per layer, all from a single forward and
                        backward pass.
            device_ids (list[int], optional): Device ID list, necessary only if
                        forward_func applies a DataParallel model. This allows
                        reconstruction of intermediate outputs from batched results
                        across devices. If forward_func is given as the DataParallel
                        model itself, then it is not necessary to provide this argument.
                        Default: None
        """
        layers, _ = _dispatch.layer_list(layer)
        _capture.check_layers_in_model(forward_func, layers)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        relu_attributions: bool = False,
        attr_dim_summation: bool = True,
        grad_kwargs: Optional[Dict[str, Any]] = None,
        *,
        virtual_layer: str = "conv1x1",
        aggregation: str = "norm",
        loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
        weights_grid: str = "input",
        channel_dim: int = 1,
        layer_call: Optional[int] = None,
    ) -> Union[LayerOutput, List[LayerOutput]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which attributions
                        are computed. If forward_func takes a single tensor as input,
                        a single input tensor should be provided. If forward_func takes
                        multiple tensors as input, a tuple of the input tensors should
                        be provided. Dimension 0 of every tensor is the batch.
                        Floating-point inputs must be finite (NaN/Inf raise ValueError).
            target (int, tuple, Tensor, or list, optional): Output indices for
                        which gradients are computed (for classification cases,
                        this is usually the target class), in every form Captum
                        accepts: an int or a one-element tensor applied to all
                        examples, a list or 1D tensor with one index per example, a
                        tuple for outputs with more than 2 dims, or a list of tuples.
                        Required when the model returns more than one value per
                        example. With ``loss_fn`` it is passed to the loss; class
                        indices (an int, a one-element tensor, a list or 1D tensor of
                        ints) are first turned into an ``(N,)`` long tensor, other
                        targets (soft labels, regression values) are passed unchanged.
                        Default: None
            additional_forward_args (Any, optional): If the forward function
                        requires additional arguments other than the inputs for
                        which attributions should not be computed, this argument
                        can be provided. A single (non-tuple) object or a tuple of
                        arguments, given to forward_func after the inputs.
                        Default: None
            attribute_to_layer_input (bool, optional): Indicates whether to
                        compute the attributions with respect to the layer input
                        or output (the virtual layer is inserted before or after the
                        layer). Not used by ``virtual_layer="weights"``.
                        Default: False
            relu_attributions (bool, optional): As in ``LayerGradCam``: apply a ReLU to
                        the map, keeping only positive attributions. A no-op for the
                        non-negative ``"norm"`` and ``"filter_norm"`` aggregations; it
                        matters for the signed ``"sum"`` and ``"max"``.
                        Default: False
            attr_dim_summation (bool, optional): As in ``LayerGradCam``: True returns
                        one value per location ``(N, 1, *locations)``. False returns
                        per-channel terms ``(N, C, *locations)`` (defined for the
                        ``"conv1x1"``, ``"scaling"`` and ``"bias"`` virtual layers with
                        ``"sum"``, whose terms add up to the map, and ``"norm"``, whose
                        terms' root-sum-of-squares is the map; see
                        :func:`captum_normgrad._maps.channel_terms`).
                        Default: True
            grad_kwargs (dict[str, Any], optional): Additional keyword arguments for
                        ``torch.autograd.grad``. With ``{"create_graph": True}`` the map
                        stays attached to the graph and is differentiable w.r.t. the
                        model's parameters and inputs (e.g. for attribution penalties
                        during training).
                        Default: None

        The NormGrad options below are keyword-only.

            virtual_layer (str, optional): Which parameter gradient is decomposed:
                        ``"conv1x1"`` (the 1x1 identity trick: NormGrad),
                        ``"scaling"`` (per-channel scale: ``x_u * g_u``), ``"bias"``
                        (``g_u``), ``"conv3x3"`` (``g_u`` times the 3x3 patch around
                        ``u``) or ``"weights"`` (the hooked Conv/Linear layer's own
                        weights, see ``weights_grid``).
                        Default: ``"conv1x1"``
            aggregation (str, optional): How a location's contribution ``T_u``
                        becomes a number: ``"norm"`` (Frobenius norm),
                        ``"filter_norm"`` (norm of the positive part), ``"sum"`` or
                        ``"max"``. ``"sum"`` and ``"max"`` give signed maps.
                        Default: ``"norm"``
            loss_fn (Callable, optional): ``(outputs, target) -> losses`` with one
                        loss per example (shape ``(N,)``, e.g.
                        ``nn.CrossEntropyLoss(reduction="none")``). When given, the
                        gradient of the loss is attributed instead of the target
                        output.
                        Default: None
            weights_grid (str, optional): For ``virtual_layer="weights"`` on a
                        convolution: ``"input"`` accumulates each patch's value onto
                        every input pixel the patch covers (the paper, map on the
                        layer-input grid); ``"output"`` keeps one value per output
                        location (the authors' later code).
                        Default: ``"input"``
            channel_dim (int, optional): Which dim of the layer tensor holds the
                        channels. 1 for ``(N, C, H, W)``; use ``-1`` for token layers
                        shaped ``(N, T, C)`` (transformer blocks), where locations are
                        tokens. Ignored for ``"weights"`` (Conv: 1, Linear: -1).
                        Default: 1
            layer_call (int, optional): For a module called several times in one
                        forward pass (e.g. the shared ``relu`` of a torchvision
                        ``BasicBlock``), which call to attribute: 0 is the first,
                        -1 the last. None requires the layer to be called once.
                        Default: None

        Returns:
            *Tensor*, *tuple[Tensor, ...]*, or a *list* of them:
            - **attributions**: the raw, unnormalised map of shape
                        ``(N, 1, *locations)`` for each layer tensor (a tuple when the
                        layer returns several tensors). With a list of layers, a list
                        with one entry per layer, in the same order. Use
                        :func:`captum_normgrad.normalize_maps` for display and
                        :func:`captum_normgrad.fuse_maps` to combine depths.

        Examples::

            >>> # ImageClassifier takes a single input tensor of images Nx3x32x32,
            >>> # and returns an Nx10 tensor of class scores. It contains a layer
            >>> # conv4 whose output has dimensions Nx50x8x8.
            >>> net = ImageClassifier()
            >>> layer_ng = LayerNormGrad(net, net.conv4)
            >>> input = torch.randn(2, 3, 32, 32)
            >>> # NormGrad for class 3: attr has shape Nx1x8x8.
            >>> attr = layer_ng.attribute(input, target=3)
            >>> # NormGrad selective, and the map of conv4's own 3x3 weights
            >>> sel = layer_ng.attribute(input, 3, virtual_layer="scaling",
            >>>                          aggregation="filter_norm")
            >>> # upsample to the input for display, like Grad-CAM
            >>> upsampled_attr = LayerAttribution.interpolate(attr, (32, 32))
        """
        layers, is_list = _dispatch.layer_list(self.layer)
        _dispatch.check_options(
            layers, virtual_layer, aggregation, weights_grid, channel_dim, attribute_to_layer_input, attr_dim_summation
        )
        _capture.check_layer_call(layer_call)
        if not isinstance(inputs, (Tensor, tuple)):
            raise TypeError(
                f"inputs must be a torch.Tensor or a tuple of tensors, got {type(inputs).__name__}; "
                "convert with torch.as_tensor(...) (or tuple(...) for several model inputs)"
            )
        inputs_t = _format_tensor_into_tuples(inputs)
        _capture.check_inputs(inputs_t)
        where = "weights" if virtual_layer == "weights" else ("input" if attribute_to_layer_input else "output")
        captures, _ = _capture.capture(
            self.forward_func,
            layers,
            inputs_t,
            target=target,
            additional_forward_args=additional_forward_args,
            where=where,
            loss_fn=loss_fn,
            device_ids=self.device_ids,
            grad_kwargs=grad_kwargs,
            layer_call=layer_call,
        )
        results: List[LayerOutput] = []
        for layer, cap in zip(layers, captures):
            maps = _dispatch.maps_for_layer(
                layer,
                cap.activations,
                cap.gradients,
                virtual_layer,
                aggregation,
                weights_grid,
                channel_dim,
                attr_dim_summation,
            )
            _dispatch.warn_degenerate(
                maps,
                "LayerNormGrad",
                "Check the target (is it the class you mean?), pick another layer, or compute in float32/float64.",
            )
            results.append(_format_output(len(maps) > 1, _dispatch.finalize(maps, relu_attributions)))
        return results if is_list else results[0]
