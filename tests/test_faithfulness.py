"""Deletion / insertion curves on a linear model whose curves are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.evaluation import blur_baseline, deletion_curve, insertion_curve


class PixelSum(nn.Module):
    """logit_0 = sum_u w_u * (sum_c x_{c,u}), logit_1 = 0."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        s = (x.sum(1) * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def hand_curves(w: np.ndarray, x: np.ndarray, order: np.ndarray, n_steps: int):
    """Deletion (baseline 0) and insertion (baseline 0) logits after removing/adding ``order`` pixels."""
    p = w.size
    contrib = (w * x.sum(0)).ravel()
    dele, ins, fr = [], [], []
    for k in range(n_steps + 1):
        cnt = (k * p) // n_steps
        chosen = order[:cnt]
        ins.append(contrib[chosen].sum())
        dele.append(contrib.sum() - contrib[chosen].sum())
        fr.append(cnt / p)
    return np.array(dele), np.array(ins), np.array(fr)


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


@given(seed=st.integers(0, 10_000), n_steps=st.sampled_from([1, 3, 5, 16, 20]))
def test_curves_and_auc_match_closed_form(seed: int, n_steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.1
    x = torch.rand(1, 2, 4, 5, generator=g, dtype=torch.float64) + 0.1
    net = PixelSum(w).double()
    maps = torch.randn(1, 1, 4, 5, generator=g, dtype=torch.float64)
    order = np.argsort(-maps.numpy().ravel(), kind="stable")
    d_exp, i_exp, fr = hand_curves(w.numpy(), x[0].numpy(), order, n_steps)
    dc = deletion_curve(net, x, maps, target=0, n_steps=n_steps, score="logit", batch_size=7)
    ic = insertion_curve(net, x, maps, target=0, n_steps=n_steps, score="logit", baseline=0.0)
    np.testing.assert_allclose(dc.fractions.numpy(), fr)
    np.testing.assert_allclose(dc.scores[0].numpy(), d_exp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ic.scores[0].numpy(), i_exp, rtol=1e-10, atol=1e-12)
    assert dc.auc.item() == pytest.approx(trapezoid(d_exp, fr))
    assert ic.auc.item() == pytest.approx(trapezoid(i_exp, fr))


def test_good_map_beats_reversed_map_and_softmax_score() -> None:
    torch.manual_seed(0)
    w = torch.rand(6, 6, dtype=torch.float64)
    net = PixelSum(w).double()
    x = torch.ones(2, 1, 6, 6, dtype=torch.float64)
    good = w.expand(2, 1, 6, 6)
    dg = deletion_curve(net, x, good, target=0, n_steps=12)
    db = deletion_curve(net, x, -good, target=0, n_steps=12)
    ig = insertion_curve(net, x, good, target=0, n_steps=12, baseline=0.0)
    ib = insertion_curve(net, x, -good, target=0, n_steps=12, baseline=0.0)
    assert (dg.auc < db.auc).all() and (ig.auc > ib.auc).all()
    logits = deletion_curve(net, x, good, target=0, n_steps=12, score="logit").scores
    torch.testing.assert_close(dg.scores, torch.sigmoid(logits))  # softmax of (s, 0) at class 0
    assert dg.mean_auc() == pytest.approx(float(dg.auc.mean()))


def test_ties_are_broken_by_row_major_index() -> None:
    w = torch.arange(1.0, 5.0, dtype=torch.float64).reshape(1, 4)
    net = PixelSum(w).double()
    x = torch.ones(1, 1, 1, 4, dtype=torch.float64)
    flat = torch.zeros(1, 1, 1, 4, dtype=torch.float64)  # all tied -> delete pixels 0, 1, 2, 3
    c = deletion_curve(net, x, flat, target=0, n_steps=4, score="logit")
    np.testing.assert_allclose(c.scores[0].numpy(), [10.0, 9.0, 7.0, 4.0, 0.0])


def test_layer_maps_are_upsampled_and_targets_per_sample() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    maps = LayerNormGrad(net, net[2]).attribute(x, target=[0, 2])  # (2, 1, 4, 4)
    c = deletion_curve(net, x, maps, target=[0, 2], n_steps=4)
    assert c.scores.shape == (2, 5)
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
        p0 = torch.softmax(net(torch.zeros_like(x)), 1)
    torch.testing.assert_close(c.scores[:, 0], p[[0, 1], [0, 2]].double())  # nothing deleted yet
    torch.testing.assert_close(c.scores[:, -1], p0[[0, 1], [0, 2]].double())  # everything deleted


def test_baselines_tensor_callable_and_blur() -> None:
    w = torch.rand(4, 4, dtype=torch.float64)
    net = PixelSum(w).double()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    maps = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    a = insertion_curve(net, x, maps, 0, n_steps=4, baseline=torch.full((1, 1, 1, 1), 0.5), score="logit")
    b = insertion_curve(net, x, maps, 0, n_steps=4, baseline=lambda t: torch.full_like(t, 0.5), score="logit")
    torch.testing.assert_close(a.scores, b.scores)
    assert a.scores[0, 0].item() == pytest.approx(0.5 * w.sum().item())
    const = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(blur_baseline(const), const)  # a blur keeps constant images
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 4] = 1.0
    blurred = blur_baseline(img, kernel_size=5, sigma=1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-6) and blurred[0, 0, 4, 4] < 1.0
    c = insertion_curve(net, x, maps, 0, n_steps=2, score="logit")  # default: blurred baseline
    assert c.scores[0, -1].item() == pytest.approx(net(x)[0, 0].item())


def test_model_state_is_restored_in_training_mode() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(2, 2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    deletion_curve(net, torch.rand(2, 1, 6, 6), torch.rand(2, 1, 3, 3), target=1, n_steps=3)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_inputs_raise_clear_errors() -> None:
    net = PixelSum(torch.rand(4, 4))
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        deletion_curve(net, x, torch.rand(3, 1, 2, 2), target=0)
    with pytest.raises(ValueError, match="n_steps"):
        deletion_curve(net, x, torch.rand(2, 1, 2, 2), target=0, n_steps=0)
    with pytest.raises(ValueError, match="fuse"):
        deletion_curve(net, x, [torch.rand(2, 1, 2, 2)], target=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not broadcast"):
        deletion_curve(net, x, torch.rand(2, 1, 2, 2), target=0, baseline=torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown baseline"):
        insertion_curve(net, x, torch.rand(2, 1, 2, 2), target=0, baseline="noise")
    with pytest.raises(ValueError, match="unknown score"):
        deletion_curve(net, x, torch.rand(2, 1, 2, 2), target=0, score="prob")
    with pytest.raises(ValueError, match="one target per sample"):
        deletion_curve(net, x, torch.rand(2, 1, 2, 2), target=[0, 1, 0])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        deletion_curve(net, (x,), torch.rand(2, 1, 2, 2), target=0)  # type: ignore[arg-type]


def test_scores_follow_the_package_target_rule() -> None:
    """Negative class indices and 1-tuples select what Captum means; bool masks are refused."""
    from captum_normgrad.evaluation.faithfulness import _score

    out = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.5, 0.25]])
    torch.testing.assert_close(_score(out, -1, "logit"), out[:, 2])
    torch.testing.assert_close(_score(out, (1,), "logit"), out[:, 1])
    torch.testing.assert_close(_score(out, torch.tensor([-1, 0]), "logit"), torch.tensor([-1.0, 3.0]))
    with pytest.raises(TypeError, match="torch.bool"):
        _score(out, torch.tensor([True, False]), "softmax")
