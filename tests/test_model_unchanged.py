"""The user's model (and inputs) are exactly as before after every call, also a raising one.

A snapshot records, per module: parameters bit for bit (and their identity, dtype, version
counter: nothing may be written into them, not even transiently), buffers bit for bit
(BatchNorm running statistics and ``num_batches_tracked``, also in training mode),
``requires_grad`` flags, ``.grad`` fields (``None`` stays ``None``; an existing gradient keeps
its object and its bits), the training flag, every hook dictionary and the instance ``__dict__``
keys; plus torch's global module hooks and the grad mode.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def _bits(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> Dict[str, Any]:
    from torch.nn.modules import module as module_mod

    snap: Dict[str, Any] = {"grad_enabled": torch.is_grad_enabled()}
    for name, p in model.named_parameters():
        snap[f"param:{name}"] = (
            id(p),
            p.dtype,
            p.requires_grad,
            p._version,
            _bits(p),
            None if p.grad is None else (id(p.grad), p.grad._version, _bits(p.grad)),
        )
    for name, b in model.named_buffers():
        snap[f"buffer:{name}"] = (id(b), b.dtype, b.requires_grad, _bits(b))
    for name, m in model.named_modules():
        snap[f"module:{name}"] = (
            id(m),
            m.training,
            sorted(m.__dict__),
            tuple(tuple((k, id(v)) for k, v in getattr(m, d).items()) for d in HOOK_DICTS if hasattr(m, d)),
        )
    snap["global_hooks"] = tuple(
        len(getattr(module_mod, d))
        for d in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )
    return snap


def assert_unchanged(before: Dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], f"model state changed: {changed}"


# ----------------------------------------------------------------------------- successful calls

CALLS: List[Tuple[str, Callable[[nn.Module], Any], Dict[str, Any]]] = [
    ("default", lambda m: m.conv2, {}),
    ("selective", lambda m: m.probe, {"virtual_layer": "scaling", "aggregation": "filter_norm"}),
    ("bias_max", lambda m: m.relu2, {"virtual_layer": "bias", "aggregation": "max"}),
    ("conv3x3_sum", lambda m: m.bn1, {"virtual_layer": "conv3x3", "aggregation": "sum"}),
    ("weights_input_grid", lambda m: m.conv2, {"virtual_layer": "weights"}),
    ("weights_output_grid_linear", lambda m: m.fc, {"virtual_layer": "weights", "weights_grid": "output"}),
    ("layer_input", lambda m: m.conv2, {"attribute_to_layer_input": True}),
    ("list_of_layers", lambda m: [m.conv1, m.bn1, m.conv2, m.fc], {}),
    ("loss_fn", lambda m: m.conv1, {"loss_fn": nn.CrossEntropyLoss(reduction="none"), "target": torch.tensor([1, 0, 4])}),
]


def _prepare(model: nn.Module, state: str) -> None:
    """Make the model's state non-trivial: existing grads, frozen params, train mode, user hooks."""
    if state in ("grads", "everything"):
        for i, p in enumerate(model.parameters()):
            if i % 2 == 0:  # half of them with an existing gradient, the others None
                p.grad = torch.randn_like(p)
    if state in ("frozen", "everything"):
        model.conv1.weight.requires_grad_(False)
        model.fc.bias.requires_grad_(False)
    if state in ("train", "everything"):
        model.train()
    if state in ("mixed_mode", "everything"):
        model.bn1.train()  # a train-mode BN inside an eval-mode model
    if state in ("hooks", "everything"):
        model.conv2.register_forward_hook(lambda m, i, o: None)
        model.conv2.register_forward_pre_hook(lambda m, i: None)
        model.bn1.register_full_backward_hook(lambda m, gi, go: None)
        model.register_forward_hook(lambda m, i, o: None)


@pytest.mark.parametrize("state", ["eval", "grads", "frozen", "train", "mixed_mode", "hooks", "everything"])
@pytest.mark.parametrize("call", range(len(CALLS)), ids=[c[0] for c in CALLS])
def test_model_unchanged_after_call(models, image_batch: Tensor, call: int, state: str) -> None:
    _, get_layer, kwargs = CALLS[call]
    kwargs = dict(kwargs)
    target = kwargs.pop("target", [1, 0, 4])
    model = models.small_cnn()
    _prepare(model, state)
    # make the BN statistics non-default so a silent reset would show
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.num_batches_tracked.fill_(7)
    inputs = image_batch.clone()
    before = snapshot(model)
    maps = LayerNormGrad(model, get_layer(model)).attribute(inputs, target, **kwargs)
    assert_unchanged(before, model)
    assert torch.equal(inputs, image_batch) and not inputs.requires_grad and inputs.grad is None
    for m in maps if isinstance(maps, list) else [maps]:
        assert torch.isfinite(m).all() and not m.requires_grad


def test_inputs_requiring_grad_keep_flag_and_get_no_grad(models, image_batch: Tensor) -> None:
    model = models.small_cnn()
    a = image_batch.clone().requires_grad_()
    before = snapshot(model)
    LayerNormGrad(model, model.conv1).attribute(a, 2)
    assert_unchanged(before, model)
    assert a.requires_grad and a.grad is None and a.is_leaf
    torch.testing.assert_close(a.detach(), image_batch)


def test_unchanged_under_no_grad_float64_and_tuple_inputs(models) -> None:
    model = models.two_input().double()
    a, b = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    before = snapshot(model)
    with torch.no_grad():
        before_nograd = snapshot(model)
        LayerNormGrad(model, [model.conv_a, model.mix]).attribute((a, b), [0, 2], additional_forward_args=(0.5,))
        assert_unchanged(before_nograd, model)
    assert_unchanged(before, model)


def test_unchanged_with_in_place_relu_after_the_layer(models) -> None:
    """``nn.ReLU(inplace=True)`` right after the hooked layer must not corrupt the capture or the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy layer
    model.eval()
    before = snapshot(model)
    got = LayerNormGrad(model, model[0]).attribute(x, 1)
    assert_unchanged(before, model)
    # reference: pre-ReLU activation, gradient through the ReLU
    pre = model[0](x).detach().requires_grad_()
    out = model[3](model[2](torch.relu(pre)))
    (g,) = torch.autograd.grad(out[:, 1].sum(), pre)
    torch.testing.assert_close(got, pre.detach().norm(dim=1, keepdim=True) * g.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------- raising calls


class RaisingLayer(nn.Module):
    """Behaves as ``inner`` until ``armed``; then raises inside the forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        if self.armed:
            raise RuntimeError("layer exploded")
        return self.inner(x)


def _raising_loss(out: Tensor, target: Any) -> Tensor:
    raise KeyError("loss exploded")


@pytest.mark.parametrize("state", ["eval", "everything"])
@pytest.mark.parametrize(
    "failure",
    ["loss_fn_raises", "layer_raises", "hooked_layer_raises", "bad_target", "scalar_loss", "nan_loss", "not_reached"],
)
def test_model_unchanged_when_call_raises(models, image_batch: Tensor, failure: str, state: str) -> None:
    model = models.small_cnn()
    model.relu2 = RaisingLayer(model.relu2)
    _prepare(model, state)
    layers: Any = [model.conv1, model.conv2]
    kwargs: Dict[str, Any] = {}
    target: Any = [1, 0, 4]
    expected: Tuple[type, str]
    if failure == "loss_fn_raises":
        kwargs["loss_fn"], expected = _raising_loss, (KeyError, "loss exploded")
    elif failure == "layer_raises":
        model.relu2.armed, expected = True, (RuntimeError, "layer exploded")
    elif failure == "hooked_layer_raises":
        model.relu2.armed, layers, expected = True, [model.conv1, model.relu2], (RuntimeError, "layer exploded")
    elif failure == "bad_target":
        target, expected = [1, 0, 99], (ValueError, "out of range")
    elif failure == "scalar_loss":
        kwargs["loss_fn"], expected = nn.CrossEntropyLoss(), (ValueError, "one loss per example")
        target = torch.tensor(target)
    elif failure == "nan_loss":
        kwargs["loss_fn"], expected = (lambda out, t: out.sum(1) * float("nan")), (ValueError, "NaN or Inf")
    else:  # a layer the forward pass never calls
        model.unused = nn.Conv2d(6, 6, 1)
        layers, expected = [model.conv1, model.unused], (ValueError, "not reached")
    before = snapshot(model)
    attr = LayerNormGrad(model, layers)
    with pytest.raises(expected[0], match=expected[1]):
        attr.attribute(image_batch, target, **kwargs)
    assert_unchanged(before, model)
    # and the model (and the attribution object) still work afterwards
    if isinstance(model.relu2, RaisingLayer):
        model.relu2.armed = False
    good = LayerNormGrad(model, model.conv2).attribute(image_batch, [1, 0, 4])
    assert torch.isfinite(good).all()
