"""Shared fixtures: seeded randomness, a hypothesis profile and tiny models.

Every model here is small enough that a forward + backward pass takes milliseconds on one CPU
core. Models are built fresh by factory functions (exposed through the session-scoped ``models``
fixture) so that a test can never leak state into another one, and so that hypothesis tests
(which must not use function-scoped fixtures for their data) can build them inside the test.

Each model that is used for the "1x1 identity" checks has a ``probe`` slot (``nn.Identity`` by
default) at an interior point: tests replace it by a real 1x1 convolution with identity weights
and compare its autograd weight gradient with NormGrad computed at the same point.
"""

from __future__ import annotations

import itertools
import os
import random
from types import SimpleNamespace
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import Tensor, nn

# ------------------------------------------------------------------ hypothesis

settings.register_profile(
    "captum_normgrad",
    deadline=None,
    max_examples=20,
    derandomize=True,  # seeded: the same examples on every run
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "captum_normgrad_thorough",
    parent=settings.get_profile("captum_normgrad"),
    max_examples=200,
    derandomize=False,
    database=None,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "captum_normgrad"))


# ------------------------------------------------------------------ seeding


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same seeds (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


# ------------------------------------------------------------------ models


class SmallCNN(nn.Module):
    """conv -> BN -> ReLU -> [probe] -> strided conv -> ReLU -> GAP -> linear. Input (N, 3, H, W)."""

    def __init__(self, num_classes: int = 5, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.probe: nn.Module = nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.probe(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class ResidualNet(nn.Module):
    """A stem, one residual block with BN (with a downsampling 1x1 shortcut) and a head."""

    def __init__(self, num_classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block_conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.block_bn1 = nn.BatchNorm2d(2 * width)
        self.block_conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.block_bn2 = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.block_out = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        h = torch.relu(self.block_bn1(self.block_conv1(s)))
        h = self.block_bn2(self.block_conv2(h))
        out = self.block_out(h + self.shortcut(s))
        return self.fc(self.pool(out).flatten(1))


class ConvHead(nn.Module):
    """Wraps one (arbitrary geometry) convolution: conv -> tanh -> mean over locations -> linear.

    ``conv`` may be an ``nn.Conv1d`` or ``nn.Conv2d``; it is the layer under test for
    ``virtual_layer="weights"``.
    """

    def __init__(self, conv: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.pre = nn.Identity()
        self.conv = conv
        self.act = nn.Tanh()
        self.fc = nn.Linear(conv.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv(self.pre(x)))
        return self.fc(h.flatten(2).mean(2))


class TokenModel(nn.Module):
    """A token model on (N, T, C): per-token linear layers, a [probe], mean over tokens, a head.

    Mimics a transformer block's MLP: activations are (N, T, C) with channels last.
    """

    def __init__(self, in_dim: int = 5, hidden: int = 7, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.mlp = nn.Linear(hidden, hidden)
        self.probe: nn.Module = nn.Identity()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.probe(self.mlp(self.act(self.embed(x))))
        return self.head(torch.tanh(h).mean(1))


class MLP(nn.Module):
    """(N, C) -> (N, K) with two linear layers (the ``Linear`` on (N, C) case)."""

    def __init__(self, in_dim: int = 6, hidden: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiOutputNet(nn.Module):
    """Output of shape (N, 3, 4): targets must be tuples (the Captum >2-D output case)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.Softplus()
        self.fc = nn.Linear(4, 12)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv(x))
        return self.fc(h.mean((2, 3))).reshape(-1, 3, 4)


class TwoInputNet(nn.Module):
    """Two image inputs plus an extra (non-attributed) scale argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, a: Tensor, b: Tensor, scale: float = 1.0, bias: Optional[Tensor] = None) -> Tensor:
        h = torch.relu(self.mix(self.conv_a(a) + scale * self.conv_b(b)))
        out = self.fc(h.mean((2, 3)))
        return out if bias is None else out + bias


def identity_conv1x1(channels: int, ndim: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A real 1x1 convolution whose weights are the identity (and no bias)."""
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[ndim]
    conv = conv_cls(channels, channels, 1, bias=False).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels, dtype=dtype).reshape(channels, channels, *([1] * ndim)))
    return conv


def _seeded(factory):
    def make(*args, seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return factory(*args, **kwargs).eval()

    make.__name__ = getattr(factory, "__name__", "make")
    return make


MODEL_FACTORIES = SimpleNamespace(
    small_cnn=_seeded(SmallCNN),
    residual=_seeded(ResidualNet),
    conv_head=_seeded(ConvHead),
    token=_seeded(TokenModel),
    mlp=_seeded(MLP),
    multi_output=_seeded(MultiOutputNet),
    two_input=_seeded(TwoInputNet),
    identity_conv1x1=identity_conv1x1,
)


@pytest.fixture(scope="session")
def models() -> SimpleNamespace:
    """Factories of fresh, seeded, eval-mode tiny models: ``models.small_cnn(seed=1)`` etc."""
    return MODEL_FACTORIES


@pytest.fixture
def small_cnn() -> SmallCNN:
    return MODEL_FACTORIES.small_cnn()


@pytest.fixture
def residual_net() -> ResidualNet:
    return MODEL_FACTORIES.residual()


@pytest.fixture
def token_model() -> TokenModel:
    return MODEL_FACTORIES.token()


@pytest.fixture
def image_batch() -> Tensor:
    """A seeded batch of 3 images, 3 x 10 x 10."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 10, 10, generator=g)


@pytest.fixture
def token_batch() -> Tensor:
    """A seeded batch of 3 sequences of 6 tokens with 5 features."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 6, 5, generator=g)


# name -> constructor; covers groups, stride, dilation and every padding form, Conv1d and Conv2d.
CONV_VARIANTS = {
    "plain": lambda: nn.Conv2d(4, 6, 3),
    "padded": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "strided": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "dilated": lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2),
    "grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "depthwise_strided": lambda: nn.Conv2d(4, 4, 3, groups=4, stride=2),
    "same": lambda: nn.Conv2d(4, 6, (2, 3), padding="same"),
    "same_dilated": lambda: nn.Conv2d(4, 6, 2, dilation=3, padding="same"),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular_dilated": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="circular"),
    "replicate_strided": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="replicate"),
    "rect_stride": lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 0)),
    "stride_uncovered": lambda: nn.Conv2d(4, 6, 2, stride=3),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    "conv1d_grouped_reflect": lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1, padding_mode="reflect"),
    "conv1d_same_circular": lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="circular"),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Any test that asks for ``conv_variant`` runs once per entry of ``CONV_VARIANTS``."""
    if "conv_variant" in metafunc.fixturenames:
        metafunc.parametrize("conv_variant", sorted(CONV_VARIANTS), indirect=True)


@pytest.fixture
def conv_variant(request: pytest.FixtureRequest) -> nn.Module:
    """A fresh, seeded convolution of the named geometry (see ``CONV_VARIANTS``)."""
    torch.manual_seed(3)
    return CONV_VARIANTS[request.param]()


# ================================================================== independent references
#
# Straightforward implementations used as oracles: they build the explicit per-location
# contributions (outer products, unfold patches) and loop over pixels. They never call
# captum_normgrad. Exposed to tests through the session-scoped ``ref`` fixture.


class RefGeom(NamedTuple):
    """Convolution geometry read directly from an ``nn.Conv*d`` (own padding arithmetic)."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pad_lo: Tuple[int, ...]
    pad_hi: Tuple[int, ...]
    mode: str
    groups: int

    @classmethod
    def of(cls, conv: nn.Module) -> "RefGeom":
        nd = len(conv.kernel_size)
        if conv.padding == "same":
            total = [conv.dilation[d] * (conv.kernel_size[d] - 1) for d in range(nd)]
            lo = tuple(t // 2 for t in total)
            hi = tuple(t - t // 2 for t in total)
        elif conv.padding == "valid":
            lo = hi = (0,) * nd
        else:
            lo = hi = tuple(conv.padding)
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), lo, hi, conv.padding_mode, conv.groups)

    @classmethod
    def neighbourhood(cls, nd: int) -> "RefGeom":
        """The conv3x3 virtual layer: 3-wide, stride 1, zero 'same' padding."""
        return cls((3,) * nd, (1,) * nd, (1,) * nd, (1,) * nd, (1,) * nd, "zeros", 1)

    @property
    def fpad(self) -> list:
        """``F.pad`` order: last dim first."""
        return [v for d in reversed(range(len(self.kernel))) for v in (self.pad_lo[d], self.pad_hi[d])]


def ref_aggregate(t: Tensor, aggregation: str) -> Tensor:
    """Aggregate explicit contributions ``(N, *L, E)`` entry by entry -> ``(N, 1, *L)``."""
    if aggregation == "norm":
        v = t.square().sum(-1).sqrt()
    elif aggregation == "filter_norm":
        v = t.clamp(min=0).square().sum(-1).sqrt()
    elif aggregation == "sum":
        v = t.sum(-1)
    elif aggregation == "max":
        v = t.max(-1).values
    else:  # pragma: no cover
        raise AssertionError(aggregation)
    return v.unsqueeze(1)


def ref_outer(g: Tensor, x: Tensor) -> Tensor:
    """``T_u = g_u x_u^T`` at every location, flattened: ``(N, *L, Cg * Cx)``."""
    t = torch.einsum("ni...,nj...->n...ij", g, x)
    return t.reshape(*t.shape[:-2], -1)


def ref_patches(x: Tensor, geom: RefGeom) -> Tensor:
    """Input patch seen by every output location, via ``F.unfold``: ``(N, C, K, *L_out)``.

    Padding is applied first with the module's own mode (so ``F.unfold`` never pads); 1-D inputs
    are images of height 1.
    """
    nd = x.dim() - 2
    mode = "constant" if geom.mode == "zeros" else geom.mode
    xp = F.pad(x, geom.fpad, mode=mode) if any(geom.fpad) else x
    k, s, d = geom.kernel, geom.stride, geom.dilation
    if nd == 1:
        xp = xp.unsqueeze(2)
        k, s, d = (1, *k), (1, *s), (1, *d)
    cols = F.unfold(xp, k, dilation=d, stride=s)
    out_sz = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    cols = cols.reshape(x.shape[0], x.shape[1], k[0] * k[1], *out_sz)
    return cols.squeeze(3) if nd == 1 else cols


def ref_weight_contribution(g: Tensor, x: Tensor, geom: RefGeom) -> Tensor:
    """Per-location weight-gradient contribution, shaped like the weight: ``(N, *L_out, C_out, C_in/G, K)``.

    ``T_u[o, i, k] = g_u[o] * patch_u[group(o) * C_in/G + i, k]``; summing over ``u`` gives the
    weight gradient of the convolution.
    """
    p = ref_patches(x, geom)
    n, cin, kk = p.shape[:3]
    gr, cout = geom.groups, g.shape[1]
    pg = p.reshape(n, gr, cin // gr, kk, *p.shape[3:])
    gg = g.reshape(n, gr, cout // gr, *g.shape[2:])
    t = torch.einsum("ngo...,ngik...->n...goik", gg, pg)
    return t.reshape(*t.shape[: g.dim() - 1], cout, cin // gr, kk)


def _source_index(p: int, size: int, mode: str) -> int:
    """The input pixel a padded coordinate reads; -1 for a zero-padded pixel."""
    if 0 <= p < size:
        return p
    if mode == "zeros":
        return -1
    if mode == "reflect":
        return -p if p < 0 else 2 * (size - 1) - p
    if mode == "replicate":
        return min(max(p, 0), size - 1)
    if mode == "circular":
        return p % size
    raise AssertionError(mode)


def ref_accumulate(m: Tensor, geom: RefGeom, in_spatial: Sequence[int]) -> Tensor:
    """Add each output location's value to every input pixel its patch covers (explicit loop).

    One addition per kernel tap; a pixel that a patch reads through two taps (possible with
    reflect/circular padding) gets the value twice; zero-padded pixels are dropped.
    """
    nd = len(in_spatial)
    out = torch.zeros(m.shape[0], 1, *in_spatial, dtype=m.dtype)
    for u in itertools.product(*[range(s) for s in m.shape[2:]]):
        for k in itertools.product(*[range(s) for s in geom.kernel]):
            src = [
                _source_index(u[d] * geom.stride[d] - geom.pad_lo[d] + k[d] * geom.dilation[d], in_spatial[d], geom.mode)
                for d in range(nd)
            ]
            if min(src) < 0:
                continue
            out[(slice(None), 0, *src)] += m[(slice(None), 0, *u)]
    return out


def ref_capture(
    model: nn.Module,
    layer: nn.Module,
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    objective: Callable[[Tensor], Tensor],
    where: str = "output",
    extra: Tuple[Any, ...] = (),
) -> Tuple[Tensor, Tensor]:
    """Own hooks: activation and gradient of ``objective(output).sum()`` at one layer.

    ``where``: ``"output"`` (x = layer output, g = its gradient), ``"input"`` (layer input) or
    ``"weights"`` (x = layer input, g = gradient w.r.t. the layer output). Works on the model
    directly (the reference is allowed to touch it; tests that check the model is unchanged
    never use it on the model under scrutiny).
    """
    store: dict = {}

    def fwd(mod, inp, out):
        store["in"], store["out"] = inp[0], out

    def pre(mod, inp):
        t = inp[0].detach().requires_grad_()
        store["in"] = t
        return (t, *inp[1:])

    h = layer.register_forward_pre_hook(pre) if where == "input" else layer.register_forward_hook(fwd)
    try:
        with torch.enable_grad():
            ins = inputs if isinstance(inputs, tuple) else (inputs,)
            out = model(*ins, *extra)
            obj = objective(out)
            assert obj.shape == (out.shape[0],)
            wrt = store["in"] if where == "input" else store["out"]
            (g,) = torch.autograd.grad(obj.sum(), wrt)
    finally:
        h.remove()
    x = store["out"] if where == "output" else store["in"]
    return x.detach(), g.detach()


def ref_normgrad(x: Tensor, g: Tensor, channel_dim: int = 1) -> Tensor:
    """``||x_u|| * ||g_u||`` with channels on ``channel_dim``: ``(N, 1, *L)``."""
    x, g = x.movedim(channel_dim, 1), g.movedim(channel_dim, 1)
    return (x.square().sum(1, keepdim=True) * g.square().sum(1, keepdim=True)).sqrt()


def draw_conv_case(data: Any, batch: Tuple[int, int] = (1, 2), dtype: torch.dtype = torch.float64) -> Tuple[nn.Module, Tensor]:
    """Hypothesis: draw a Conv1d/Conv2d with random groups/stride/dilation/padding(+mode) and an input."""
    from hypothesis import strategies as st

    nd = data.draw(st.sampled_from([1, 2]), label="ndim")
    groups = data.draw(st.sampled_from([1, 2, 3]), label="groups")
    cin = groups * data.draw(st.integers(1, 2), label="cin_per_group")
    cout = groups * data.draw(st.integers(1, 2), label="cout_per_group")
    k = tuple(data.draw(st.integers(1, 3), label=f"kernel{d}") for d in range(nd))
    dil = tuple(data.draw(st.integers(1, 2), label=f"dilation{d}") for d in range(nd))
    mode = data.draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]), label="padding_mode")
    sizes = [data.draw(st.integers(max(dil[d] * (k[d] - 1) + 1, 3), dil[d] * (k[d] - 1) + 6), label=f"size{d}") for d in range(nd)]
    if data.draw(st.booleans(), label="same"):
        stride: Tuple[int, ...] = (1,) * nd
        padding: Any = "same"
    else:
        stride = tuple(data.draw(st.integers(1, 3), label=f"stride{d}") for d in range(nd))
        padding = tuple(data.draw(st.integers(0, 2), label=f"padding{d}") for d in range(nd))
        if mode != "zeros":  # reflect/circular need padding < size
            padding = tuple(min(p, s - 1) for p, s in zip(padding, sizes))
    conv_cls = nn.Conv1d if nd == 1 else nn.Conv2d
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    conv = conv_cls(cin, cout, k, stride=stride, padding=padding, dilation=dil, groups=groups, padding_mode=mode).to(dtype)
    n = data.draw(st.integers(*batch), label="batch")
    x = torch.randn(n, cin, *sizes, dtype=dtype)
    return conv, x


REFERENCES = SimpleNamespace(
    Geom=RefGeom,
    aggregate=ref_aggregate,
    outer=ref_outer,
    patches=ref_patches,
    weight_contribution=ref_weight_contribution,
    accumulate=ref_accumulate,
    capture=ref_capture,
    normgrad=ref_normgrad,
    draw_conv_case=draw_conv_case,
)


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The independent reference implementations above."""
    return REFERENCES


# --------------------------------------------------------------------------- test tiers
# End-to-end files (subprocesses, the installed command, docs build, browser, runner kills) are
# marked ``e2e``; together with ``slow`` they are what a developer's fast loop skips:
#     pytest -m "not slow and not e2e"        (about a minute)
# CI runs everything.
E2E_FILES = {
    "test_cli.py",
    "test_runner.py",
    "test_benchmarks_quick.py",
    "test_docs.py",
    "test_browser.py",
    "test_report.py",
    "test_reliability.py",
    "test_registry.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)
