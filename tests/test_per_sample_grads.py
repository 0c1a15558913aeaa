"""The activation x backprop engine: per-sample gradients against a per-sample autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from captum_normgrad._per_sample_grads import (
    NotCovered,
    coverage_problem,
    per_sample_grads,
    training_mode_offenders,
)

torch.set_num_threads(1)


def engine_grads(model, x, y, names, chunk_size=None, chunk_bytes=64 * 2**20, block_numel=2**18):
    params = dict(model.named_parameters())
    got = {n: torch.full((x.shape[0], *params[n].shape), float("nan"), dtype=x.dtype) for n in names}

    def consume(name, g, samples, rows):
        assert torch.isnan(got[name][samples, rows]).all(), "a block was delivered twice"
        got[name][samples, rows] = g

    per_sample_grads(
        model, x, lambda out: F.cross_entropy(out, y, reduction="none"), names, consume,
        chunk_size=chunk_size, chunk_bytes=chunk_bytes, block_numel=block_numel,
    )
    assert not any(torch.isnan(g).any() for g in got.values()), "a block was never delivered"
    return got


def loop_grads(model, x, y, names):
    """Independent reference: one batch-1 forward/backward per sample with autograd.grad."""
    params = dict(model.named_parameters())
    rows = {n: [] for n in names}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [params[n] for n in names], allow_unused=True
        )
        for n, g in zip(names, grads):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in rows.items()}


class Zoo(nn.Module):
    """Every layer form the engine serves: strides, dilation, groups, depthwise, padding modes and
    'same', Conv1d, BatchNorm 1d/2d with in-place ReLU after them, Linear on 3-D input, no-bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")  # depthwise
        self.c4 = nn.Conv2d(8, 6, (3, 2), padding="same", padding_mode="circular")
        self.c5 = nn.Conv2d(6, 6, 2, stride=(2, 1), padding="valid")
        self.c6 = nn.Conv1d(6, 4, 3, stride=2, padding=1)
        self.b6 = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = self.r1(self.b1(self.c1(x)))
        h = F.relu(self.c2(h)) + h
        h = torch.tanh(self.c3(h))
        h = F.gelu(self.c4(h))
        h = self.c5(h)  # (N, 6, h, w)
        h = h.flatten(2)  # (N, 6, L): a 1-D signal
        h = F.relu(self.b6(self.c6(h)), inplace=True)
        h = self.lin(h.transpose(1, 2))  # Linear on (N, L, 4)
        return self.fc(h.mean(1))


def make_zoo(dtype=torch.float64):
    torch.manual_seed(0)
    m = Zoo()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.to(dtype).eval()


@pytest.mark.parametrize("size", [12, 48])  # 48 px: layers with >= 512 locations take the batch-1 kernel path
@pytest.mark.parametrize("which", ["all", "weights"])  # "weights": no served output is modified in place
def test_every_layer_form_equals_the_per_sample_loop_in_float64(size, which):
    model = make_zoo()
    names = [n for n, p in model.named_parameters() if which == "all" or p.dim() > 1]
    assert coverage_problem(model, names) is None
    x = torch.randn(5, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1, 0])
    want = loop_grads(model, x, y, names)
    # whole batch, a chunk of 2 samples, a memory budget forcing one sample per chunk, and blocks of
    # a few output channels (or groups) per sample
    for kw in ({}, {"chunk_size": 2}, {"chunk_bytes": 1}, {"block_numel": 50}, {"block_numel": 1, "chunk_size": 3}):
        got = engine_grads(model, x, y, names, **kw)
        for n in names:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-13, msg=lambda m, n=n, kw=kw: f"{n} {kw}: {m}")


def test_model_left_untouched_and_no_grad_written():
    model = make_zoo()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    engine_grads(model, x, torch.tensor([0, 1, 2]), [n for n, _ in model.named_parameters()])
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")


class UsesWeightOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x) + F.conv2d(x, self.conv.weight)  # the weight also used outside its module
        return self.fc(h.mean((2, 3)))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("model_cls", [UsesWeightOutside, CalledTwice])
def test_uses_the_engine_cannot_see_are_detected_at_run_time(model_cls):
    model = model_cls().eval()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    names = [n for n, _ in model.named_parameters()]
    assert coverage_problem(model, names) is None  # statically fine...
    with pytest.raises(NotCovered):  # ...but caught while the model runs
        engine_grads(model, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]), names)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


class Standardised(nn.Conv2d):
    def forward(self, x):  # weight standardisation: a subclass with its own forward
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w)


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_static_coverage_problems_name_the_cause():
    assert "Standardised" in coverage_problem(nn.Sequential(Standardised(3, 2, 1)), ["0.weight"])
    lin = nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "weight", Double())
    assert "parametrised" in coverage_problem(nn.Sequential(lin), ["0.bias"])
    shared = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    shared[1].weight = shared[0].weight
    assert "shared" in coverage_problem(shared, ["0.weight"])
    bn = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert "batch statistics" in coverage_problem(bn, ["0.weight"])
    assert "LayerNorm" in coverage_problem(nn.Sequential(nn.LayerNorm(3)), ["0.weight"])


def test_training_mode_offenders():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(0.1), nn.ReLU())
    assert training_mode_offenders(m.train()) == ["1", "2"]
    assert training_mode_offenders(m.eval()) == []


def test_create_graph_gives_the_double_backward_input_gradient():
    """d/dx of a function of the per-sample gradients, against a loop of create_graph autograd."""
    model = make_zoo()
    names = ["c1.weight", "c3.weight", "c6.weight", "lin.weight", "b1.weight"]
    params = dict(model.named_parameters())
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2, 0, 1])

    def objective(grads):  # a smooth function of each sample's gradients: sum of squares
        return sum((g**2).flatten(1).sum(1) for g in grads)

    want = []
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        gs = torch.autograd.grad(
            F.cross_entropy(model(xi), y[i : i + 1]), [params[n] for n in names], create_graph=True
        )
        want.append(torch.autograd.grad(objective([g.unsqueeze(0) for g in gs]).sum(), xi)[0])
    want = torch.cat(want)

    xr = x.clone().requires_grad_(True)
    got_g = {}

    def consume(name, g, samples, rows):
        got_g.setdefault(name, []).append(g)

    per_sample_grads(model, xr, lambda o: F.cross_entropy(o, y, reduction="none"), names, consume, create_graph=True)
    total = objective([torch.cat(got_g[n]) for n in names]).sum()
    got = torch.autograd.grad(total, xr)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
