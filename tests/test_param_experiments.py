"""Input-space saliency vs a hand-built double backward; experiments vs hand-made copies; no side effects."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import nn

from captum_normgrad.parameter_saliency import (
    InputSpaceSaliency,
    ParameterSaliency,
    POTScorer,
    cosine_distance,
    fine_tune_experiment,
    layer_depth_bias,
    nearest_neighbors,
    stage_labels,
    turn_off_experiment,
)

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Softplus(), nn.Conv2d(6, 6, 1))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(torch.tanh(self.bn1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.3, 0.3)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m.eval()


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def fitted():
    model = make()
    ps = ParameterSaliency(model).fit([data(8, seed=s) for s in range(10, 14)], progress=False, keep_profiles=True)
    return model, ps


def snapshot(model: nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.detach().clone() for n, b in model.named_buffers()},
        {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    )


def assert_bit_identical(a, b) -> None:
    for da, db in zip(a[:2], b[:2]):
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    for k in a[2]:
        (ra, ga), (rb, gb) = a[2][k], b[2][k]
        assert ra == rb and ((ga is None and gb is None) or torch.equal(ga, gb))
    assert a[3] == b[3] and a[4] == b[4]


def hand_built_input_saliency(model, x, y, mean, std, k, boost):
    """Per sample: autograd.grad(create_graph=True) for the weight grads, then backward to the input."""
    ref = copy.deepcopy(model).eval()
    convs = [p for _, p in ref.named_parameters() if p.dim() == 4]
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(ref(xi), y[i : i + 1])
        grads = torch.autograd.grad(loss, convs, create_graph=True)
        s = torch.cat([g.abs().reshape(g.shape[0], -1).mean(1) for g in grads])
        z = (s.double() - mean) / std
        target = z.detach().clone()
        top = torch.argsort(target, descending=True, stable=True)[:k]
        target[top] *= boost
        cos = (z * target).sum() / (z.norm() * target.norm())
        (gx,) = torch.autograd.grad(cos, xi)
        out.append(gx[0])
    return torch.stack(out)


# --------------------------------------------------------------------------- input space


def test_input_space_saliency_matches_hand_built_double_backward(fitted):
    model, ps = fitted
    x, y = data(3)
    before = snapshot(model)
    isal = InputSpaceSaliency(ps)
    assert isinstance(isal, Attribution)
    attr = isal.attribute(x, y, k=4)
    assert_bit_identical(before, snapshot(model))
    assert attr.shape == x.shape
    mean, std = ps.statistics.mean, ps.statistics.std()
    want = hand_built_input_saliency(model, x, y, mean, std, 4, 100.0)
    assert want.abs().max() > 0
    torch.testing.assert_close(attr, want.to(attr.dtype), rtol=2e-4, atol=1e-6)
    heat = isal.attribute(x, y, k=4, reduce="max_abs")
    assert heat.shape == (3, 1, 6, 6)
    torch.testing.assert_close(heat, want.abs().amax(1, keepdim=True).to(heat.dtype), rtol=2e-4, atol=1e-6)


def test_input_space_naive_mode_and_batch_invariance(fitted):
    model, ps = fitted
    x, y = data(3, seed=5)
    isal = InputSpaceSaliency(ps)
    a = isal.attribute(x, y, k=2, mode="naive")
    ones = torch.ones(ps.num_features, dtype=torch.float64)
    want = hand_built_input_saliency(model, x, y, torch.zeros_like(ones), ones, 2, 100.0)
    torch.testing.assert_close(a, want.to(a.dtype), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(isal.attribute(x[1:2], y[1:2], k=2, mode="naive")[0], a[1], rtol=1e-5, atol=1e-7)


def test_input_space_errors():
    ps = ParameterSaliency(make())
    x, y = data(2)
    with pytest.raises(ValueError, match="fit"):
        InputSpaceSaliency(ps).attribute(x, y)
    with pytest.raises(TypeError, match="ParameterSaliency"):
        InputSpaceSaliency(make())
    with pytest.raises(ValueError, match="k must"):
        InputSpaceSaliency(ps).attribute(x, y, k=0, mode="naive")
    with pytest.raises(ValueError, match="reduce"):
        InputSpaceSaliency(ps).attribute(x, y, mode="naive", reduce="mean")
    for bad in (float("nan"), float("inf")):  # used to pass silently (NaN attributions)
        with pytest.raises(ValueError, match="boost must be a finite number"):
            InputSpaceSaliency(ps).attribute(x, y, mode="naive", boost=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        InputSpaceSaliency(ps).attribute(x, y, mode="naive", chunk_size=0)


@pytest.mark.parametrize("engine", ["batched", "vmap", "loop"])
def test_input_space_every_engine_matches_hand_built_double_backward(engine):
    model = make()
    x, y = data(3, seed=7)
    ps = ParameterSaliency(model, mode="naive", strategy=engine)
    before = snapshot(model)
    got = InputSpaceSaliency(ps).attribute(x, y, k=3, chunk_size=2)
    assert_bit_identical(before, snapshot(model))
    ones = torch.ones(ps.num_features, dtype=torch.float64)
    want = hand_built_input_saliency(model, x, y, torch.zeros_like(ones), ones, 3, 100.0)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=1e-6)


# --------------------------------------------------------------------------- turn-off


def test_turn_off_experiment_matches_zeroed_copies_and_leaves_model_untouched(fitted):
    model, ps = fitted
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)  # a stale .grad must survive
    x, y = data(12, seed=3)
    before = snapshot(model)
    table = turn_off_experiment(ps, x, y, ks=(1, 3), n_random=3, seed=0, progress=False)
    assert_bit_identical(before, snapshot(model))
    model.fc.weight.grad = None

    with torch.no_grad():
        p0 = torch.softmax(model(x).double(), 1)
    mis = torch.nonzero(p0.argmax(1) != y).flatten()
    assert 0 < len(mis) < 12
    z = ps.saliency(x[mis], y[mis])
    order = torch.argsort(z, dim=1, descending=True, stable=True)
    for k in (1, 3):
        for name, sel in (("top-k salient", order[:, :k]), ("least salient", order[:, -k:])):
            drops, rises, fixed = [], [], []
            for row, i in enumerate(mis.tolist()):
                m = copy.deepcopy(model)
                with torch.no_grad():
                    for idx in sel[row].tolist():
                        ref = ps.locate(idx)
                        dict(m.named_parameters())[ref.parameter][ref.channel].zero_()
                    p = torch.softmax(m(x[i : i + 1]).double(), 1)[0]
                wrong = int(p0[i].argmax())
                drops.append(float(p0[i, wrong] - p[wrong]))
                rises.append(float(p[y[i]] - p0[i, y[i]]))
                fixed.append(float(p.argmax() == y[i]))
            row_t = next(r for r in table if r["k"] == k and r["filters"] == name)
            assert row_t["n_samples"] == len(mis)
            assert row_t["wrong_prob_drop"] == pytest.approx(np.mean(drops), abs=1e-6)
            assert row_t["true_prob_rise"] == pytest.approx(np.mean(rises), abs=1e-6)
            assert row_t["fraction_corrected"] == pytest.approx(np.mean(fixed))
    assert {r["filters"] for r in table} == {"top-k salient", "random", "least salient"}
    assert "| k | filters |" in table.to_markdown()


def test_turn_off_with_pot_ranking_and_errors(fitted):
    model, ps = fitted
    x, y = data(12, seed=3)
    pot = POTScorer(progress=False, min_peaks=2).fit(ps.reference_profiles)
    table = turn_off_experiment(ps, x, y, ks=(2,), ranking=pot, n_random=2, progress=False)
    assert len(table) == 3
    with pytest.raises(ValueError, match="not fitted"):
        turn_off_experiment(ps, x, y, ranking=POTScorer(), progress=False)
    with pytest.raises(ValueError, match="ranking"):
        turn_off_experiment(ps, x, y, ranking="zscore", progress=False)
    with pytest.raises(ValueError, match="ks"):
        turn_off_experiment(ps, x, y, ks=(ps.num_features + 1,), progress=False)
    with torch.no_grad():
        pred = model(x).argmax(1)
    with pytest.raises(ValueError, match="misclassified"):
        turn_off_experiment(ps, x, pred, ks=(1,), progress=False)
    unfitted = ParameterSaliency(model)
    with pytest.raises(ValueError, match="fit"):
        turn_off_experiment(unfitted, x, y, ks=(1,), progress=False)
    assert len(turn_off_experiment(unfitted, x, y, ks=(1,), ranking="naive", n_random=1, progress=False)) == 3


# --------------------------------------------------------------------------- fine-tune


def test_fine_tune_experiment_matches_manual_sgd_step_and_leaves_model_untouched(fitted):
    model, ps = fitted
    x, y = data(12, seed=3)
    before = snapshot(model)
    k, lr = 3, 0.5  # a large step so that the effect is visible
    table = fine_tune_experiment(ps, x, y, k=k, lr=lr, n_neighbors=2, max_sources=1, progress=False)
    assert_bit_identical(before, snapshot(model))

    with torch.no_grad():
        p0 = torch.softmax(model(x).double(), 1)
    mis = torch.nonzero(p0.argmax(1) != y).flatten()
    src = int(mis[0])
    z = ps.saliency(x[mis], y[mis])
    top = torch.argsort(z[0], descending=True, stable=True)[:k].tolist()
    m = copy.deepcopy(model)
    loss = F.cross_entropy(m(x[src : src + 1]), y[src : src + 1])
    params = dict(m.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    with torch.no_grad():
        for idx in top:
            ref = ps.locate(idx)
            params[ref.parameter][ref.channel] -= lr * grads[ref.parameter][ref.channel]
        p1 = torch.softmax(m(x).double(), 1)
    rows = {r["samples"]: r for r in table}
    assert rows["fine-tuned sample"]["n"] == 1
    assert rows["fine-tuned sample"]["true_prob_rise"] == pytest.approx(float(p1[src, y[src]] - p0[src, y[src]]), abs=1e-6)
    assert rows["fine-tuned sample"]["true_prob_rise"] > 0  # a gradient step lowers the loss
    # the neighbours are the 2 closest other misclassified samples by cosine distance
    d = cosine_distance(z[:1], z)[0]
    d[0] = float("inf")
    nbrs = torch.argsort(d)[:2]
    want = np.mean([float(p1[mis[j], y[mis[j]]] - p0[mis[j], y[mis[j]]]) for j in nbrs.tolist()])
    assert rows["nearest neighbours"]["n"] == 2
    assert rows["nearest neighbours"]["true_prob_rise"] == pytest.approx(want, abs=1e-6)
    assert rows["nearest neighbours"]["mean_cosine_distance"] == pytest.approx(float(d[nbrs].mean()), abs=1e-9)
    assert rows["random misclassified"]["n"] == 2


def test_fine_tune_errors(fitted):
    model, ps = fitted
    x, y = data(12, seed=3)
    with pytest.raises(ValueError, match="n_neighbors"):
        fine_tune_experiment(ps, x, y, n_neighbors=100, progress=False)
    with pytest.raises(ValueError, match="lr"):
        fine_tune_experiment(ps, x, y, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="at least 2 misclassified"):
        with torch.no_grad():
            pred = model(x).argmax(1)
        fine_tune_experiment(ps, x, pred, progress=False)


# --------------------------------------------------------------------------- neighbours and depth bias


def test_nearest_neighbors_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, pool = torch.randn(4, 9, generator=g), torch.randn(10, 9, generator=g)
    dist, idx = nearest_neighbors(q, pool, k=3)
    qn = q.double().numpy() / np.linalg.norm(q.double().numpy(), axis=1, keepdims=True)
    pn = pool.double().numpy() / np.linalg.norm(pool.double().numpy(), axis=1, keepdims=True)
    d = np.abs(qn @ pn.T - 1)
    np.testing.assert_array_equal(idx.numpy(), np.argsort(d, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(dist.numpy(), np.sort(d, axis=1)[:, :3], rtol=1e-12)
    _, idx_self = nearest_neighbors(pool[:4], pool, k=2, exclude=torch.arange(4))
    assert all(int(idx_self[i, 0]) != i for i in range(4))
    with pytest.raises(ValueError, match="k must"):
        nearest_neighbors(q, pool, k=11)


def test_layer_depth_bias_shares(fitted):
    model, ps = fitted
    x, y = data(10, seed=8)
    prof = ps.profiles(x, y)
    pot = POTScorer(progress=False, min_peaks=2).fit(ps.reference_profiles)
    table = layer_depth_bias(ps, prof, k=3, pot=pot)
    labels = stage_labels(ps)
    assert [r["stage"] for r in table] == ["conv1", "layer2"]
    assert [r["n_filters"] for r in table] == [labels.count("conv1"), labels.count("layer2")]
    for col in ("share_of_filters", "share_top_k_naive", "share_top_k_standardized", "share_top_k_pot"):
        assert sum(r[col] for r in table) == pytest.approx(1.0)
    top = torch.argsort(prof, dim=1, descending=True, stable=True)[:, :3].flatten().tolist()
    assert table[0]["share_top_k_naive"] == pytest.approx(sum(labels[i] == "conv1" for i in top) / len(top))
    assert stage_labels(ps, stages=3) == ["depth 1/3"] * 4 + ["depth 2/3"] * 6 + ["depth 3/3"] * 6
    assert set(stage_labels(ps, stages=lambda name: name[:2])) == {"co", "la"}
    with pytest.raises(ValueError, match="profiles"):
        layer_depth_bias(ps, prof[:, :3])


def test_experiments_work_with_a_users_full_backward_hook(fitted):
    """Issue 15: a full backward hook used to fail inside torch.func; the results must not change."""
    model, ps = fitted
    x, y = data(12, seed=3)
    want_ft = fine_tune_experiment(ps, x, y, k=3, lr=0.5, n_neighbors=2, max_sources=2, progress=False)
    want_off = turn_off_experiment(ps, x, y, ks=[1, 2], n_random=2, progress=False)
    handle = model.layer2.register_full_backward_hook(lambda m, gi, go: None)
    try:
        got_ft = fine_tune_experiment(ps, x, y, k=3, lr=0.5, n_neighbors=2, max_sources=2, progress=False)
        got_off = turn_off_experiment(ps, x, y, ks=[1, 2], n_random=2, progress=False)
    finally:
        handle.remove()
    for got, want in ((got_ft, want_ft), (got_off, want_off)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
                else:
                    assert a[key] == b[key], key
