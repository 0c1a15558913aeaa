r"""A bridge to Quantus (optional extra ``captum-normgrad[quantus]``).

Quantus metrics call an ``explain_func(model, inputs, targets, **kwargs)`` with numpy inputs and
expect numpy attributions. Randomisation metrics such as ``quantus.MPRT`` deep-copy the model and
call the explanation function with the copy, so the layer must be found *on the model it is
given*: :func:`make_explain_func` stores the layer's **name** and looks it up at each call.

This module does not import Quantus; it only produces the callable. Example::

    import quantus
    from captum_normgrad import LayerNormGrad
    from captum_normgrad.evaluation.quantus_bridge import make_explain_func

    explain = make_explain_func(LayerNormGrad, "layer2")
    scores = quantus.PointingGame()(model=model, x_batch=x, y_batch=y, s_batch=masks,
                                     explain_func=explain)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .._layers import module_by_name
from .._maps import reduce_map_channels, resize_maps

__all__ = ["make_explain_func"]

# keyword arguments Quantus may pass along that are not attribution arguments
_QUANTUS_ONLY_KWARGS = ("device", "softmax", "channel_first", "model_predict_kwargs")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def make_explain_func(
    method: Callable[..., Any],
    layer: str,
    method_kwargs: Optional[Dict[str, Any]] = None,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
    interpolate_mode: str = "bilinear",
    reduce_channels: str = "sum",
    upsample: bool = True,
) -> Callable[..., np.ndarray]:
    r"""An ``explain_func`` for Quantus from any Captum layer attribution class and a layer name.

    The returned function ``explain(model, inputs, targets, **kwargs)``:

    1. looks ``layer`` up by name on ``model`` (the model Quantus passes, possibly a randomised
       deep copy), builds ``method(model, layer_module, **method_kwargs)``;
    2. converts ``inputs`` (numpy ``(N, C, H, W)``) and ``targets`` (``(N,)``) to tensors on the
       model's device;
    3. calls ``attribute(inputs, target=targets, **attribute_kwargs, **kwargs)``;
    4. sums the map's channels, upsamples it to the input size and returns a float32 numpy array
       ``(N, 1, H, W)``.

    The model's mode and parameters are left as Quantus gave them.

    Args:
        method (type or Callable): e.g. ``LayerNormGrad``, ``captum.attr.LayerGradCam``, or a
                    factory ``method(model, layer)``.
        layer (str): layer name, a key of ``dict(model.named_modules())``.
        method_kwargs (dict, optional): extra constructor arguments. Default: None
        attribute_kwargs (dict, optional): extra ``attribute`` arguments (e.g.
                    ``{"relu_attributions": True}``). Default: None
        interpolate_mode (str, optional): upsampling mode. Default: ``"bilinear"``
        reduce_channels (str, optional): ``"sum"`` or ``"mean"`` over map channels. Default: ``"sum"``
        upsample (bool, optional): upsample to the input size (Quantus needs input-sized maps
                    for most metrics). Default: True

    Returns:
        Callable: ``explain(model, inputs, targets, **kwargs) -> np.ndarray``.

    Examples::

        >>> import quantus
        >>> explain = make_explain_func(LayerNormGrad, "conv4")
        >>> a = explain(net, x.numpy(), np.array([3, 1]))        # (2, 1, 32, 32) float32
        >>> quantus.MPRT()(model=net, x_batch=x.numpy(), y_batch=y, explain_func=explain)
    """
    if not callable(method):
        raise TypeError(f"method must be an attribution class or factory, got {type(method).__name__}")
    if not isinstance(layer, str):
        raise TypeError(
            f"layer must be a layer name (str) so it can be found on the copies Quantus makes, got "
            f"{type(layer).__name__}; e.g. 'layer2'"
        )
    if reduce_channels not in ("sum", "mean"):
        raise ValueError(f"unknown reduce_channels {reduce_channels!r}; choose 'sum' or 'mean'")
    mk = dict(method_kwargs or {})
    ak = dict(attribute_kwargs or {})

    def explain_func(model: nn.Module, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
        if not isinstance(model, nn.Module):
            raise TypeError(f"explain_func needs a torch.nn.Module, got {type(model).__name__}")
        device = _model_device(model)
        x = inputs if isinstance(inputs, Tensor) else torch.as_tensor(np.asarray(inputs))
        x = x.to(device=device, dtype=torch.float32)
        if targets is None:
            tgt: Any = None
        else:
            t = targets if isinstance(targets, Tensor) else torch.as_tensor(np.asarray(targets))
            t = t.to(device=device, dtype=torch.long).reshape(-1)
            tgt = int(t) if t.numel() == 1 and x.shape[0] == 1 else t
            if isinstance(tgt, Tensor) and tgt.shape[0] != x.shape[0]:
                raise ValueError(
                    f"batch sizes differ: {x.shape[0]} inputs but {tgt.shape[0]} targets; give one target per input"
                )
        extra = {k: v for k, v in kwargs.items() if k not in _QUANTUS_ONLY_KWARGS}
        attr = method(model, module_by_name(model, layer), **mk)
        maps = attr.attribute(x, target=tgt, **{**ak, **extra})
        if isinstance(maps, list):
            raise ValueError("the method returned a list of maps (several layers); give one layer name")
        if isinstance(maps, tuple):
            maps = maps[0]
        maps = reduce_map_channels(maps.detach(), reduce_channels)
        if upsample and maps.dim() == x.dim():
            maps = resize_maps(maps, x.shape[2:], interpolate_mode)
        return maps.float().cpu().numpy()

    explain_func.__name__ = f"explain_{getattr(method, '__name__', 'method')}_{layer.replace('.', '_')}"
    return explain_func
