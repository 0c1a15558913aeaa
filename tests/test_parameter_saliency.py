"""ParameterSaliency: profiles vs a per-sample autograd loop, statistics vs numpy, invariances, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_normgrad.parameter_saliency import FilterRef, ParameterSaliency, WelfordState, merge_welford
from captum_normgrad.parameter_saliency.profiles import SIGMA_FLOOR

torch.set_num_threads(1)


class Block(nn.Module):
    """Residual block with a strided 1x1 'downsample' convolution (like torchvision's ResNet)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, groups=2)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))) + self.downsample(x))


class TinyNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3, dead: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Block(width, 2 * width)
        self.dead = nn.Conv2d(3, 2, 1) if dead else None  # never influences the loss: zero gradients
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer1(F.relu(self.bn(self.stem(x))))
        out = self.fc(h.mean(dim=(2, 3)))
        if self.dead is not None:
            out = out + 0.0 * self.dead(x).detach().sum()
        return out


def make_model(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyNet(**kw)
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def data(n: int, seed: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def loop_profiles(model: nn.Module, x: torch.Tensor, y: torch.Tensor, aggregation: str = "filter") -> torch.Tensor:
    """Straightforward reference: one sample at a time, autograd.grad on a deep copy in eval mode."""
    ref = copy.deepcopy(model).eval()
    names = [n for n, p in ref.named_parameters() if p.dim() == 4] if aggregation == "filter" else [
        n for n, _ in ref.named_parameters()
    ]
    params = dict(ref.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
        if aggregation == "filter":
            rows.append(torch.cat([g.abs().reshape(g.shape[0], -1).mean(1) for g in grads]))
        else:
            rows.append(torch.cat([g.abs().reshape(-1) for g in grads]))
    return torch.stack(rows)


def snapshot(model: nn.Module):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def assert_same(a, b) -> None:
    for key in ("params", "buffers", "grad"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            if a[key][n] is None or b[key][n] is None:
                assert a[key][n] is None and b[key][n] is None, (key, n)
            else:
                assert torch.equal(a[key][n], b[key][n]), (key, n)
    for key in ("requires_grad", "training", "hooks"):
        assert a[key] == b[key], key


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("vectorize", [True, False])
def test_filter_profiles_match_per_sample_autograd_loop(vectorize):
    model = make_model()
    x, y = data(6)
    ps = ParameterSaliency(model, mode="naive", vectorize=vectorize)
    got = ps.profiles(x, y)
    want = loop_profiles(model, x, y)
    assert got.shape == (6, ps.num_features) == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    # filters of the dead conv have zero gradient
    dead = ps.filter_index("dead.weight", 0)
    assert torch.all(got[:, dead : dead + 2] == 0)


def test_parameter_wise_profiles_match_loop_over_all_parameters():
    model = make_model()
    x, y = data(4)
    ps = ParameterSaliency(model, mode="naive", aggregation="parameter")
    assert ps.parameter_names == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(ps.profiles(x, y), loop_profiles(model, x, y, "parameter"), rtol=1e-5, atol=1e-8)


def test_profile_order_and_locate_follow_named_parameters():
    model = make_model()
    ps = ParameterSaliency(model)
    expected = []
    for name, p in model.named_parameters():
        if p.dim() == 4:
            expected += [(name, name.rsplit(".", 1)[0], c) for c in range(p.shape[0])]
    assert ps.num_features == len(expected)
    for i, (pname, module, channel) in enumerate(expected):
        ref = ps.locate(i)
        assert isinstance(ref, FilterRef)
        assert (ref.parameter, ref.module, ref.channel, ref.index) == (pname, module, channel, i)
        assert ps.filter_index(pname, channel) == i
    assert "layer1.downsample.0" in ps.feature_modules()
    with pytest.raises(IndexError):
        ps.locate(ps.num_features)


def test_parameter_wise_locate_gives_element_inside_filter():
    model = make_model()
    ps = ParameterSaliency(model, aggregation="parameter", parameters="conv")
    w = model.layer1.conv2.weight
    start = dict(ps.feature_slices())["layer1.conv2.weight"].start
    for flat in (0, 7, w.numel() - 1):
        idx = np.unravel_index(flat, tuple(w.shape))
        ref = ps.locate(start + flat)
        assert ref.module == "layer1.conv2" and ref.channel == idx[0] and ref.element == tuple(int(i) for i in idx[1:])


def test_batch_invariance_and_chunking():
    model = make_model()
    x, y = data(5)
    full = ParameterSaliency(model, mode="naive").profiles(x, y)
    chunked = ParameterSaliency(model, mode="naive", chunk_size=2).profiles(x, y)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-9)
    ps = ParameterSaliency(model, mode="naive")
    for i in range(5):
        torch.testing.assert_close(ps.profiles(x[i : i + 1], y[i : i + 1])[0], full[i], rtol=1e-5, atol=1e-8)
    # a sample's profile does not depend on its batch companions
    other = torch.cat([x[:1], torch.randn(3, 3, 8, 8)])
    torch.testing.assert_close(ps.profiles(other, torch.cat([y[:1], y[1:4]]))[0], full[0], rtol=1e-5, atol=1e-8)


def test_train_mode_model_is_refused_and_left_untouched():
    """One policy for the package: BatchNorm/Dropout in training mode are refused (order 1 does the same)."""
    model = make_model().train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.stem.bias.requires_grad_(False)
    before = snapshot(model)
    x, y = data(4)
    ps = ParameterSaliency(model, mode="naive")
    for call in (lambda: ps.profiles(x, y), lambda: ps.fit([(x, y)], progress=False)):
        with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
            call()
        assert_same(before, snapshot(model))
    # in eval mode the same object works, and a train-mode model without BatchNorm/Dropout is fine
    model.eval()
    torch.testing.assert_close(ps.profiles(x, y), loop_profiles(model, x, y), rtol=1e-5, atol=1e-8)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).train()
    got = ParameterSaliency(plain, mode="naive").profiles(x, y)
    torch.testing.assert_close(got, loop_profiles(plain, x, y), rtol=1e-5, atol=1e-8)
    assert plain.training


# --------------------------------------------------------------------------- statistics


def test_fit_statistics_and_modes_match_numpy():
    model = make_model()
    batches = [data(5, seed=s) for s in range(10, 14)] + [data(3, seed=20)]
    ps = ParameterSaliency(model)
    ps.fit(batches, progress=False, keep_profiles=True)
    ref = np.concatenate([loop_profiles(model, xb, yb).double().numpy() for xb, yb in batches])
    mu, sd = ref.mean(0), ref.std(0, ddof=1)
    assert ps.statistics.count == ref.shape[0]
    np.testing.assert_allclose(ps.statistics.mean.numpy(), mu, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(ps.statistics.variance().numpy(), ref.var(0, ddof=1), rtol=1e-4, atol=1e-16)
    # float32: entries far below the profile's scale (1e-2) carry absolute rounding errors of ~1e-9
    np.testing.assert_allclose(ps.reference_profiles.numpy(), ref, rtol=1e-5, atol=1e-8)
    assert (sd <= SIGMA_FLOOR).any()  # the dead conv
    sd_safe = np.where(sd <= SIGMA_FLOOR, 1.0, sd)
    mu_safe = np.where(mu <= SIGMA_FLOOR, 1.0, mu)
    x, y = data(4, seed=99)
    s = loop_profiles(model, x, y).double().numpy()
    z = ps.saliency(x, y).double().numpy()
    np.testing.assert_allclose(z, (s - mu) / sd_safe, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ps.saliency(x, y, mode="norm").numpy(), s / mu_safe, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ps.saliency(x, y, mode="naive").numpy(), s, rtol=1e-5, atol=1e-9)
    dead = ps.filter_index("dead.weight", 0)
    assert np.all(z[:, dead : dead + 2] == 0)


def test_fit_options_dict_batches_and_max_batches():
    model = make_model()
    batches = [{"image": xb, "label": yb} for xb, yb in (data(4, seed=s) for s in range(3))]
    ps = ParameterSaliency(model).fit(batches, max_batches=2, progress=True)
    assert ps.statistics.count == 8 and ps.is_fitted
    with pytest.raises(TypeError, match="dataloader"):
        ps.fit([torch.zeros(2, 3, 8, 8)], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        ps.fit([data(1)], progress=False)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
    seed=st.integers(0, 10_000),
)
def test_welford_merge_equals_numpy_over_the_union(sizes, seed):
    rng = np.random.default_rng(seed)
    shards = [rng.normal(3.0, 2.0, size=(n, 4)) * rng.uniform(0.1, 10, size=4) for n in sizes]
    states = [WelfordState(4).update(torch.from_numpy(s)) for s in shards]
    merged = merge_welford(states)
    allv = np.concatenate(shards)
    assert merged.count == allv.shape[0]
    np.testing.assert_allclose(merged.mean.numpy(), allv.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.variance().numpy(), allv.var(0, ddof=1), rtol=1e-9, atol=1e-10)
    # order does not matter; pack/unpack round trip (what an all_gather transports)
    rev = merge_welford(WelfordState.unpack(s.pack()) for s in reversed(states))
    np.testing.assert_allclose(rev.mean.numpy(), merged.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rev.m2.numpy(), merged.m2.numpy(), rtol=1e-9, atol=1e-12)


def test_statistics_from_shards_give_the_same_saliency_as_fit():
    model = make_model()
    batches = [data(4, seed=s) for s in range(4)]
    whole = ParameterSaliency(model).fit(batches, progress=False)
    a, b = ParameterSaliency(model), ParameterSaliency(model)
    for xb, yb in batches[:1]:
        a.update_statistics(xb, yb)
    for xb, yb in batches[1:]:
        b.update_statistics(xb, yb)
    c = ParameterSaliency(model)
    c.statistics = a.statistics.merge(b.statistics)
    x, y = data(3, seed=7)
    torch.testing.assert_close(c.saliency(x, y), whole.saliency(x, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different model"):
        c.statistics = WelfordState(3)


def test_rank_by_value_and_abs_match_numpy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 30, generator=g)
    for by, key in (("value", z.numpy()), ("abs", np.abs(z.numpy()))):
        got = ParameterSaliency.rank(z, k=7, by=by).numpy()
        want = np.argsort(-key, axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="by"):
        ParameterSaliency.rank(z, by="size")


def test_top_filters_returns_filter_refs():
    model = make_model()
    ps = ParameterSaliency(model, mode="naive")
    x, y = data(2)
    refs = ps.top_filters(x, y, k=3)
    z = ps.profiles(x, y)
    for row, zi in zip(refs, z):
        assert [r.index for r in row] == torch.argsort(zi, descending=True, stable=True)[:3].tolist()
        assert all(isinstance(r, FilterRef) and r.module for r in row)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_model_identity_checks(tmp_path):
    model = make_model()
    ps = ParameterSaliency(model).fit([data(4, seed=s) for s in range(2)], progress=False)
    path = tmp_path / "stats.pt"
    ps.save(path)
    again = ParameterSaliency(make_model(seed=3)).load(path)  # same architecture, other weights: fine
    torch.testing.assert_close(again.statistics.mean, ps.statistics.mean)
    assert again.statistics.count == ps.statistics.count
    with pytest.raises(ValueError, match="different model"):
        ParameterSaliency(make_model(width=6)).load(path)  # other shapes
    renamed = make_model()
    renamed.trunk = renamed.layer1  # same shapes, other names
    del renamed.layer1
    with pytest.raises(ValueError, match="different model"):
        ParameterSaliency(renamed).load(path)
    with pytest.raises(ValueError, match="aggregation"):
        ParameterSaliency(model, aggregation="parameter").load(path)
    with pytest.raises(ValueError, match="fit"):
        ParameterSaliency(model).save(tmp_path / "none.pt")
    torch.save({"mean": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not parameter-saliency statistics"):
        ParameterSaliency(model).load(tmp_path / "foreign.pt")


# --------------------------------------------------------------------------- bad inputs


def test_model_without_conv_layers():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with pytest.raises(ValueError, match="no convolution filters.*aggregation='parameter'"):
        ParameterSaliency(mlp)
    x, y = torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 2])
    ps = ParameterSaliency(mlp, aggregation="parameter", mode="naive")
    assert ps.profiles(x, y).shape == (3, sum(p.numel() for p in mlp.parameters()))
    units = ParameterSaliency(mlp, parameters="all", mode="naive")  # filter = output unit / bias entry
    assert units.num_features == 5 + 5 + 3 + 3
    assert units.locate(6).parameter == "1.bias" and units.locate(6).channel == 1


def test_unfitted_standardized_mode_and_other_bad_inputs():
    model = make_model()
    ps = ParameterSaliency(model)
    x, y = data(2)
    with pytest.raises(ValueError, match=r"fit\(reference_loader\)"):
        ps.saliency(x, y)
    with pytest.raises(ValueError, match="fit"):
        ps.saliency(x, y, mode="norm")
    assert ps.saliency(x, y, mode="naive").shape == (2, ps.num_features)
    same = ps.profiles(x, y)
    torch.testing.assert_close(ps.profiles(x, y.numpy()), same)  # numpy labels
    torch.testing.assert_close(ps.profiles(x, [np.int64(v) for v in y.tolist()]), same)
    torch.testing.assert_close(ps.profiles(x[:1], int(y[0])), same[:1])
    with pytest.raises(ValueError, match="target is required"):
        ps.profiles(x, None)
    with pytest.raises(ValueError, match="3 outputs"):
        ps.profiles(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"one per example \(2\)"):
        ps.profiles(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        ps.profiles(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        ps.profiles(x.clone().fill_(float("nan")), y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ps.profiles(x.numpy(), y)
    with pytest.raises(ValueError, match="mode"):
        ParameterSaliency(model, mode="zscore")
    with pytest.raises(ValueError, match="aggregation"):
        ParameterSaliency(model, aggregation="tensor")
    with pytest.raises(ValueError, match="unknown parameter"):
        ParameterSaliency(model, parameters=["nope.weight"])
    with pytest.raises(TypeError, match="nn.Module"):
        ParameterSaliency(lambda t: t)
    with pytest.raises(ValueError, match="chunk_size"):
        ParameterSaliency(model, chunk_size=0)


def test_explicit_parameter_list_and_custom_loss():
    model = make_model()
    x, y = data(3)
    names = ["layer1.conv2.weight", "stem.weight"]
    ps = ParameterSaliency(model, mode="naive", parameters=names)
    assert ps.parameter_names == ["stem.weight", "layer1.conv2.weight"]  # named_parameters() order
    full = ParameterSaliency(model, mode="naive")
    sl = dict(full.feature_slices())
    want = torch.cat([full.profiles(x, y)[:, sl["stem.weight"]], full.profiles(x, y)[:, sl["layer1.conv2.weight"]]], 1)
    torch.testing.assert_close(ps.profiles(x, y), want)
    # a loss scaled by 2 doubles every profile
    double = ParameterSaliency(model, mode="naive", parameters=names, loss_fn=lambda o, t: 2 * F.cross_entropy(o, t))
    torch.testing.assert_close(double.profiles(x, y), 2 * want, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- engines and the model at call time (issues 14, 15)


@pytest.mark.parametrize("engine", ["auto", "batched", "vmap", "loop"])
@pytest.mark.parametrize("aggregation", ["filter", "parameter"])
def test_every_engine_matches_the_loop(engine, aggregation):
    model = make_model()
    x, y = data(5)
    ps = ParameterSaliency(model, mode="naive", aggregation=aggregation, strategy=engine, chunk_size=2)
    torch.testing.assert_close(ps.profiles(x, y), loop_profiles(model, x, y, aggregation), rtol=1e-5, atol=1e-8)


def test_a_module_swapped_after_construction_is_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()
    x, y = data(4)
    for engine in ("auto", "vmap", "loop"):
        ps = ParameterSaliency(model, mode="naive", strategy=engine)
        before = ps.profiles(x, y)
        model[1] = nn.Tanh()  # swapped after construction: the call must follow the model as it is now
        got = ps.profiles(x, y)
        torch.testing.assert_close(got, loop_profiles(model, x, y), rtol=1e-5, atol=1e-8)
        assert (got - before).abs().max() > 1e-4
        model[1] = nn.ReLU()
    model[2] = nn.Conv2d(4, 5, 3)
    with pytest.raises(ValueError, match="changed shape"):
        ps.profiles(x, y)


def test_models_with_a_users_full_backward_hook_work():
    model = make_model()
    calls = []
    handle = model.layer1.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    x, y = data(4)
    want = loop_profiles(model, x, y)
    calls.clear()
    before = snapshot(model)
    for engine in ("auto", "loop"):
        ps = ParameterSaliency(model, mode="naive", strategy=engine)
        torch.testing.assert_close(ps.profiles(x, y), want, rtol=1e-5, atol=1e-8)
        assert_same(before, snapshot(model))
    assert calls  # the user's hook ran, as in a plain backward pass
    with pytest.raises(ValueError, match="backward hooks.*layer1.*strategy='auto' or 'loop'"):
        ParameterSaliency(model, mode="naive", strategy="vmap").profiles(x, y)
    # a model the batched engine does not cover falls back to the loop (torch.func cannot run the hook)
    ln = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    ln[1].register_full_backward_hook(lambda m, gi, go: None)
    ps = ParameterSaliency(ln, mode="naive", parameters="all")
    assert ps.resolve_strategy() == "loop"
    torch.testing.assert_close(ps.profiles(x, y), loop_filter_all(ln, x, y), rtol=1e-5, atol=1e-8)
    handle.remove()


def loop_filter_all(model, x, y):
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.abs().reshape(g.shape[0], -1).mean(1) for g in grads]))
    return torch.stack(rows)


def test_uncovered_models_fall_back_and_engine_batched_refuses_them():
    class WeightStd(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight - self.weight.mean(), self.bias)

    model = nn.Sequential(WeightStd(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    x, y = data(3)
    ps = ParameterSaliency(model, mode="naive")
    assert ps.resolve_strategy() == "vmap"
    torch.testing.assert_close(ps.profiles(x, y), loop_profiles(model, x, y), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="WeightStd.*strategy='auto'"):
        ParameterSaliency(model, mode="naive", strategy="batched").profiles(x, y)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ParameterSaliency(model, strategy="grouped")
    with pytest.raises(ValueError, match="vectorize=False"):
        ParameterSaliency(model, vectorize=False, strategy="vmap")


def test_a_model_modifying_its_input_in_place_and_the_callers_tensor_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 3)).eval()
    x, y = data(3)
    keep = x.clone()
    ps = ParameterSaliency(model, mode="naive")
    assert ps.resolve_strategy() == "batched"
    got = ps.profiles(x, y)
    assert torch.equal(x, keep)
    torch.testing.assert_close(got, loop_profiles(model, keep.clone(), y), rtol=1e-5, atol=1e-8)
