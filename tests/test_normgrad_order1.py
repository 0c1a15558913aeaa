"""Order-1 NormGrad against an independent naive implementation and its stated identities.

The reference below deep-copies the model for every sample, takes an explicit SGD step with
``loss.backward()`` and builds theta+/theta- explicitly; it shares no code with the package.
"""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad, LayerNormGradOrder1

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- models
class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.conv2(self.relu(self.bn1(self.conv1(x)))))


class SmallNet(nn.Module):
    """BatchNorm, a residual block and a grouped conv: the cases the issue names."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Residual(8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.down(self.block(self.stem(x))))


def make_model(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    m = SmallNet()
    # non-trivial BatchNorm statistics
    with torch.no_grad():
        m.stem[1].running_mean.uniform_(-0.2, 0.2)
        m.stem[1].running_var.uniform_(0.5, 1.5)
        m.block.bn1.running_mean.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def model() -> SmallNet:
    return make_model(0)


@pytest.fixture
def batch() -> Tuple[Tensor, List[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 8, 8, generator=g), [0, 2, 3]


# -------------------------------------------------------------------- naive reference
def _capture_point(model: nn.Module, layer_name: str, x: Tensor, target: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Activation, activation gradient and parameter gradients of CE at a named layer (one sample)."""
    layer = dict(model.named_modules())[layer_name]
    store = {}

    def hook(mod: nn.Module, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        out.retain_grad()
        store["x"] = out

    h = layer.register_forward_hook(hook)
    try:
        model.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
    finally:
        h.remove()
    return store["x"].detach(), store["x"].grad.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _with_params(model: nn.Module, values: List[Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(m.parameters(), values):
            p.copy_(v)
    return m


def naive_order1(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    targets: List[int],
    eps: float,
    adversarial: bool = False,
    hessian: str = "finite_difference",
) -> Tensor:
    maps = []
    for i, t in enumerate(targets):
        xi, ti = x[i : i + 1], torch.tensor([t])
        base = copy.deepcopy(model)
        theta = [p.detach().clone() for p in base.parameters()]
        _, _, g = _capture_point(base, layer_name, xi, ti)
        s = 1.0 if adversarial else -1.0
        stepped = _with_params(base, [a + s * eps * b for a, b in zip(theta, g)])
        x_p, g_p, v = _capture_point(stepped, layer_name, xi, ti)
        if hessian == "none":
            comb = g_p
        else:
            vn = torch.sqrt(sum((vv**2).sum() for vv in v))
            h = 0.5 / vn
            _, g_plus, _ = _capture_point(_with_params(base, [a + h * b for a, b in zip(theta, v)]), layer_name, xi, ti)
            _, g_minus, _ = _capture_point(_with_params(base, [a - h * b for a, b in zip(theta, v)]), layer_name, xi, ti)
            comb = g_p + s * eps / (2 * h) * (g_plus - g_minus)
        maps.append(comb.norm(dim=1, keepdim=True) * x_p.norm(dim=1, keepdim=True))
    return torch.cat(maps)


def state_snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "flags": {k: v.requires_grad for k, v in model.named_parameters()},
        "grads": {k: (None if v.grad is None else v.grad.clone()) for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        },
    }


def assert_same_state(a: dict, b: dict) -> None:
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    assert a["flags"] == b["flags"]
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None), k
        if ga is not None:
            assert torch.equal(ga, gb), k
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("layer_name", ["stem.2", "block", "down"])
@pytest.mark.parametrize("adversarial", [False, True])
def test_matches_naive_reference(model, batch, layer_name, adversarial):
    x, t = batch
    layer = dict(model.named_modules())[layer_name]
    ours = LayerNormGradOrder1(model, layer).attribute(x, t, epsilon=5e-3, adversarial=adversarial)
    ref = naive_order1(model, layer_name, x, t, 5e-3, adversarial)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)


def test_lookahead_equals_order0_on_explicitly_stepped_model(model, batch):
    x, t = batch
    eps = 2e-3
    ours = LayerNormGradOrder1(model, model.block).attribute(x, t, epsilon=eps, hessian="none")
    ref = naive_order1(model, "block", x, t, eps, hessian="none")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    # and, once more, with LayerNormGrad (loss objective) on a model stepped by hand
    for i, ti in enumerate(t):
        stepped = copy.deepcopy(model)
        loss = F.cross_entropy(stepped(x[i : i + 1]), torch.tensor([ti]))
        grads = torch.autograd.grad(loss, list(stepped.parameters()))
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads):
                p.sub_(eps * g)
        o0 = LayerNormGrad(stepped, stepped.block).attribute(
            x[i : i + 1], ti, loss_fn=lambda o, tt: F.cross_entropy(o, torch.as_tensor([tt]), reduction="none")
        )
        torch.testing.assert_close(ours[i : i + 1], o0, rtol=1e-4, atol=1e-7)


def test_epsilon_to_zero_recovers_order0_with_loss(model, batch):
    x, t = batch
    o0 = LayerNormGrad(model, model.block).attribute(
        x, t, loss_fn=lambda o, tt: F.cross_entropy(o, torch.as_tensor(tt), reduction="none")
    )
    for hess in ("finite_difference", "exact", "none"):
        o1 = LayerNormGradOrder1(model, model.block).attribute(x, t, epsilon=1e-9, hessian=hess)
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-8)


def test_exact_agrees_with_finite_difference(model, batch):
    x, t = batch
    attr = LayerNormGradOrder1(model, model.block)
    fd = attr.attribute(x, t, epsilon=5e-2)
    ex = attr.attribute(x, t, epsilon=5e-2, hessian="exact")
    # float64: the finite-difference error of a centred scheme is O(h^2)
    m64 = make_model(0).double()
    a64 = LayerNormGradOrder1(m64, m64.block)
    fd_small = a64.attribute(x.double(), t, epsilon=5e-2, h=1e-4)
    ex64 = a64.attribute(x.double(), t, epsilon=5e-2, hessian="exact")
    torch.testing.assert_close(fd_small, ex64, rtol=1e-6, atol=1e-10)
    # with the paper's h (0.5/||v||, a large step) they differ by the finite-difference error,
    # which shrinks as h does once the step stays clear of ReLU kinks, down to round-off
    ex32 = ex.double()
    err_paper = ((fd.double() - ex32).abs().max() / ex32.abs().max()).item()
    assert 0 < err_paper < 0.2
    scale = ex64.abs().max().item()
    errs = [(a64.attribute(x.double(), t, epsilon=5e-2, h=hh) - ex64).abs().max().item() / scale
            for hh in (1e-3, 1e-4, 1e-5)]
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 1e-8


def test_batch_invariance_and_determinism(model, batch):
    x, t = batch
    attr = LayerNormGradOrder1(model, model.down)
    full = attr.attribute(x, t, epsilon=5e-3)
    again = attr.attribute(x, t, epsilon=5e-3)
    assert torch.equal(full, again)
    single = torch.cat([attr.attribute(x[i : i + 1], t[i], epsilon=5e-3) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-8)
    chunked = attr.attribute(x, t, epsilon=5e-3, chunk_size=1)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "target",
    [2, torch.tensor(2), torch.tensor([2]), [2, 2, 2], torch.tensor([2, 2, 2]), (2,), [(2,), (2,), (2,)], -2,
     torch.tensor([-2, 2, -2])],
    ids=["int", "0d", "1elem", "list", "tensor", "1-tuple", "list-of-1-tuples", "negative", "negative-tensor"],
)
def test_target_forms(model, batch, target):
    """Every Captum target form, including negative indices (the model has 4 classes: -2 is 2) and
    1-tuples on 2-D outputs, means the same as the plain list."""
    x, _ = batch
    attr = LayerNormGradOrder1(model, model.block)
    ref = attr.attribute(x, [2, 2, 2])
    torch.testing.assert_close(attr.attribute(x, target), ref)


def test_list_of_layers_and_weights_mode(model, batch):
    x, t = batch
    maps = LayerNormGradOrder1(model, [model.block, model.down]).attribute(x, t)
    assert [m.shape for m in maps] == [(3, 1, 8, 8), (3, 1, 4, 4)]
    one = LayerNormGradOrder1(model, model.down).attribute(x, t)
    torch.testing.assert_close(maps[1], one)
    w = LayerNormGradOrder1(model, model.down).attribute(x, t, virtual_layer="weights")
    assert w.shape == (3, 1, 8, 8) and bool((w >= 0).all())


def test_weights_mode_matches_reference(model, batch):
    """virtual_layer='weights' with eps -> 0 equals order-0 'weights' with the loss objective."""
    x, t = batch
    lf = lambda o, tt: F.cross_entropy(o, torch.as_tensor(tt), reduction="none")  # noqa: E731
    o0 = LayerNormGrad(model, model.down).attribute(x, t, virtual_layer="weights", loss_fn=lf)
    o1 = LayerNormGradOrder1(model, model.down).attribute(x, t, virtual_layer="weights", epsilon=1e-9)
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-8)


def test_zero_gradient_sample_is_finite_and_order0_at_theta_prime():
    """A saturated sample: the loss is exactly 0 in float32, so grad l(theta') = 0 and h = inf."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    with torch.no_grad():
        m[3].weight.mul_(0.0)
        m[3].bias.copy_(torch.tensor([200.0, 0.0, 0.0]))
    x = torch.rand(2, 3, 4, 4)
    loss = F.cross_entropy(m(x), torch.tensor([0, 0]), reduction="none")
    assert bool((loss == 0).all())  # the premise of the test
    attr = LayerNormGradOrder1(m, m[1])
    for eps in (5e-4, 5e-3, 5e-2, 5e-1):
        out = attr.attribute(x, 0, epsilon=eps)
        assert bool(torch.isfinite(out).all())
        # order 0 at theta' (= theta, since the gradient is zero) is zero as well
        o0 = LayerNormGrad(m, m[1]).attribute(
            x, 0, loss_fn=lambda o, tt: F.cross_entropy(o, tt, reduction="none")
        )
        torch.testing.assert_close(out, o0)
    # float64 recomputation of the underflowing samples gives a real (non-zero) map
    auto = attr.attribute(x, 0, compute_dtype="auto")
    assert auto.dtype == torch.float32 and bool(torch.isfinite(auto).all())
    m64 = copy.deepcopy(m).double()
    full64 = LayerNormGradOrder1(m64, m64[1]).attribute(x.double(), 0)
    torch.testing.assert_close(auto, full64.float(), rtol=1e-4, atol=0)


def test_float64_compute_dtype(model, batch):
    x, t = batch
    out = LayerNormGradOrder1(model, model.block).attribute(x, t, compute_dtype=torch.float64)
    assert out.dtype == torch.float64
    ref = naive_order1(copy.deepcopy(model).double(), "block", x.double(), t, 5e-4)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


def test_model_unchanged_after_calls_and_raising_calls(model, batch):
    x, t = batch
    # populate some .grad fields and a user hook, so that they must survive too
    model(x).sum().backward()
    handle = model.block.register_forward_hook(lambda *a: None)
    before = state_snapshot(model)
    LayerNormGradOrder1(model, model.block).attribute(x, t)
    LayerNormGradOrder1(model, model.block).attribute(x, t, hessian="exact", adversarial=True)
    assert_same_state(before, state_snapshot(model))

    def bad_loss(outputs, target):
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        LayerNormGradOrder1(model, model.block, loss_fn=bad_loss).attribute(x, t)
    assert_same_state(before, state_snapshot(model))
    handle.remove()


def test_captum_generic_hooks_removed_on_error(model, batch):
    """Captum's generic check: no hook left after a successful call, a bad target, or a raising layer."""
    x, t = batch

    def hook_counts() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    n0 = hook_counts()
    attr = LayerNormGradOrder1(model, model.block)
    attr.attribute(x, t)
    assert hook_counts() == n0
    with pytest.raises(ValueError, match="out of range"):
        attr.attribute(x, 7)
    assert hook_counts() == n0

    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("layer failed")

    m2 = nn.Sequential(nn.Conv2d(3, 2, 1), Boom(), nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(RuntimeError, match="layer failed"):
        LayerNormGradOrder1(m2, m2[0]).attribute(x, 0)
    assert all(len(m._forward_hooks) == 0 for m in m2.modules())


def test_per_example_targets_equal_batch(model, batch):
    """Captum's generic check: per-example targets give each example's single-target result."""
    x, _ = batch
    attr = LayerNormGradOrder1(model, model.block)
    mixed = attr.attribute(x, [1, 3, 0])
    for i, ti in enumerate([1, 3, 0]):
        torch.testing.assert_close(mixed[i : i + 1], attr.attribute(x[i : i + 1], ti))


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs(model, batch):
    x, t = batch
    with pytest.raises(TypeError, match="nn.Module"):
        LayerNormGradOrder1(lambda z: model(z), model.block)  # type: ignore[arg-type]
    frozen = make_model(0).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        LayerNormGradOrder1(frozen, frozen.block)
    attr = LayerNormGradOrder1(model, model.block)
    with pytest.raises(ValueError, match="target is required"):
        attr.attribute(x)
    with pytest.raises(ValueError, match="out of range"):
        attr.attribute(x, [0, 1, 9])
    with pytest.raises(ValueError, match="3 examples"):
        attr.attribute(x, [0, 1])
    with pytest.raises(ValueError, match="hessian"):
        attr.attribute(x, t, hessian="newton")
    with pytest.raises(ValueError, match="epsilon"):
        attr.attribute(x, t, epsilon=float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        attr.attribute(x * float("inf"), t)
    with pytest.raises(ValueError, match="NaN or Inf"):
        LayerNormGradOrder1(model, model.block, loss_fn=lambda o, tt: o.sum(1) * float("nan")).attribute(x, t)
    with pytest.raises(ValueError, match="one loss per example"):
        LayerNormGradOrder1(model, model.block, loss_fn=lambda o, tt: o.sum()).attribute(x, t)
    other = make_model(1)
    with pytest.raises(ValueError, match="not a submodule"):
        LayerNormGradOrder1(model, other.block)
    train = make_model(0).train()
    with pytest.raises(ValueError, match="model.eval"):
        LayerNormGradOrder1(train, train.block).attribute(x, t)
    assert train.training  # the mode is not changed by the check
    with pytest.raises(ValueError, match="chunk_size"):
        attr.attribute(x, t, chunk_size=0)


@pytest.mark.parametrize("hessian", ["finite_difference", "exact", "none"])
def test_vmap_and_loop_strategies_agree(model, batch, hessian):
    x, t = batch
    attr = LayerNormGradOrder1(model, [model.block, model.down])
    a = attr.attribute(x, t, epsilon=5e-3, hessian=hessian, strategy="vmap")
    b = attr.attribute(x, t, epsilon=5e-3, hessian=hessian, strategy="loop")
    for ma, mb in zip(a, b):
        torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="strategy"):
        attr.attribute(x, t, strategy="threads")
