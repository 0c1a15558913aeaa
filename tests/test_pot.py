"""POTScorer: GPD recovery on synthetic data, tail probabilities vs the closed form, policies, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import genpareto

from captum_normgrad.parameter_saliency import POTScorer

TRUE_PARAMS = [(0.25, 2.0), (0.0, 1.0), (-0.2, 0.5)]


def synthetic_reference(n: int = 10_000, seed: int = 0, t0: float = 5.0) -> np.ndarray:
    """Per column: 90% uniform below t0, 10% t0 + GPD(gamma, sigma) peaks."""
    rng = np.random.default_rng(seed)
    cols = []
    n_peaks = n // 10
    for gamma, sigma in TRUE_PARAMS:
        below = rng.uniform(0.0, t0, size=n - n_peaks)
        peaks = genpareto.rvs(gamma, loc=0.0, scale=sigma, size=n_peaks, random_state=rng)
        col = np.concatenate([below, t0 + peaks])
        cols.append(rng.permutation(col))
    return np.stack(cols, axis=1)


@pytest.fixture(scope="module")
def fitted():
    ref = synthetic_reference()
    return ref, POTScorer(progress=False).fit(torch.from_numpy(ref))


def closed_form(z, gamma, sigma, frac):
    if gamma == 0:
        return frac * np.exp(-z / sigma)
    base = np.maximum(1.0 + gamma * z / sigma, 0.0)
    with np.errstate(divide="ignore"):
        return frac * np.where(base > 0, base ** (-1.0 / gamma), 0.0)


def test_thresholds_are_numpy_quantiles_and_fit_recovers_known_gpd(fitted):
    ref, pot = fitted
    np.testing.assert_allclose(pot.thresholds.numpy(), np.quantile(ref, 0.9, axis=0))
    np.testing.assert_array_equal(pot.n_peaks.numpy(), (ref > np.quantile(ref, 0.9, axis=0)).sum(0))
    assert pot.fitted.all() and pot.n_reference == ref.shape[0]
    for j, (gamma, sigma) in enumerate(TRUE_PARAMS):
        assert abs(float(pot.gpd_shape[j]) - gamma) < 0.08, (j, float(pot.gpd_shape[j]))
        assert abs(float(pot.gpd_scale[j]) / sigma - 1) < 0.1, (j, float(pot.gpd_scale[j]))


def test_tail_probability_matches_closed_form_and_nan_below_threshold(fitted):
    ref, pot = fitted
    t = pot.thresholds.numpy()
    frac = pot.n_peaks.numpy() / ref.shape[0]
    s = np.stack([t - 0.5, t, t + 0.1, t + 1.0, t + 3.0])
    p = pot.tail_probability(torch.from_numpy(s)).numpy()
    assert np.isnan(p[:2]).all()  # at or below the threshold: not ranked
    for j in range(len(TRUE_PARAMS)):
        g, sg = float(pot.gpd_shape[j]), float(pot.gpd_scale[j])
        np.testing.assert_allclose(p[2:, j], closed_form(s[2:, j] - t[j], g, sg, frac[j]), rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-4, 20.0), min_size=2, max_size=8, unique=True))
def test_scores_are_monotone_decreasing_in_s(fitted, exceedances):
    _, pot = fitted
    z = np.sort(np.array(exceedances))
    s = pot.thresholds.numpy()[None, :] + z[:, None]
    p = pot.tail_probability(s).numpy()
    assert np.all(np.diff(p, axis=0) <= 0)
    assert np.all(p[~np.isnan(p)] >= 0) and np.all(p[~np.isnan(p)] <= 0.1 + 1e-12)


def test_exponential_case_gamma_zero():
    # 1) the score at gamma == 0 exactly is the exponential form
    ref = synthetic_reference(n=2_000, seed=3)
    pot = POTScorer(progress=False).fit(ref)
    state = pot.state_dict()
    state["shape"] = torch.zeros_like(state["shape"])
    exp_pot = POTScorer.from_state_dict(state)
    t, sigma = exp_pot.thresholds.numpy(), exp_pot.gpd_scale.numpy()
    frac = exp_pot.n_peaks.numpy() / 2_000
    z = np.array([0.01, 0.5, 2.0])
    p = exp_pot.tail_probability(t[None, :] + z[:, None]).numpy()
    np.testing.assert_allclose(p, frac[None, :] * np.exp(-z[:, None] / sigma[None, :]), rtol=1e-12)
    # 2) exponential peaks are fitted with gamma close to 0 and the scores follow
    col = 1  # TRUE_PARAMS[1] is (0, 1)
    ref = synthetic_reference(n=20_000, seed=4)
    pot = POTScorer(progress=False).fit(ref[:, [col]])
    assert abs(float(pot.gpd_shape[0])) < 0.06
    assert abs(float(pot.gpd_scale[0]) - 1.0) < 0.08


def test_negative_shape_beyond_the_endpoint_scores_zero(fitted):
    _, pot = fitted
    j = 2  # gamma < 0: bounded support
    g, sg = float(pot.gpd_shape[j]), float(pot.gpd_scale[j])
    assert g < 0
    s = pot.thresholds.numpy().copy()[None, :] + 0.01
    s[0, j] = pot.thresholds.numpy()[j] + 1.5 * (-sg / g)
    assert pot.tail_probability(s).numpy()[0, j] == 0.0


def test_rank_and_order(fitted):
    _, pot = fitted
    t = pot.thresholds.numpy()
    s = np.stack([t + np.array([0.5, 3.0, -1.0]), t - 1.0])
    p = pot.tail_probability(s).numpy()
    ranked = pot.rank(s)
    assert ranked[1].numel() == 0
    want = np.flatnonzero(~np.isnan(p[0]))
    want = want[np.argsort(p[0, want])]
    assert ranked[0].tolist() == want.tolist()
    assert pot.rank(s, k=1)[0].tolist() == want[:1].tolist()
    order = pot.order(s)
    assert sorted(order[0].tolist()) == [0, 1, 2]
    assert order[0, : len(want)].tolist() == want.tolist()


def _with_degenerate_filter(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    good = rng.exponential(1.0, size=n)
    flat = np.zeros(n)  # e.g. a filter whose gradient is always zero: no peaks
    return np.stack([good, flat], axis=1)


@pytest.mark.parametrize("policy", ["empirical", "exclude", "zero"])
def test_no_peak_policies(policy):
    ref = _with_degenerate_filter()
    pot = POTScorer(no_peaks=policy, progress=False).fit(ref)
    assert pot.n_peaks.tolist()[1] == 0 and not bool(pot.fitted[1])
    s = np.array([[np.quantile(ref[:, 0], 0.9) + 0.5, 1e-3]])
    p = pot.tail_probability(s).numpy()[0]
    expected = {"empirical": 1.0 / (ref.shape[0] + 1), "exclude": np.nan, "zero": 0.0}[policy]
    np.testing.assert_equal(p[1], expected)
    ranked = pot.rank(s)[0].tolist()
    if policy == "exclude":
        assert ranked == [0]
    elif policy == "zero":
        assert ranked == [1, 0]  # the reference code's behaviour: the no-peak filter comes first
    else:
        assert set(ranked) == {0, 1} and ranked == sorted([0, 1], key=lambda j: p[j])
    # at or below its threshold the degenerate filter is never ranked
    assert 1 not in pot.rank(np.array([[5.0, 0.0]]))[0].tolist()


def test_empirical_fallback_for_too_few_peaks():
    rng = np.random.default_rng(0)
    col = rng.normal(size=30)  # 3 peaks < min_peaks=5: empirical tail
    pot = POTScorer(progress=False).fit(col[:, None])
    assert not bool(pot.fitted[0]) and int(pot.n_peaks[0]) == 3
    s = np.sort(col)[-2]  # exceeded by one value, equal to one
    p = float(pot.tail_probability(np.array([[s]]))[0, 0])
    assert p == pytest.approx((2 + 1) / (30 + 1))


def test_authors_configuration_uses_order_statistic_threshold():
    rng = np.random.default_rng(1)
    ref = rng.exponential(size=(57, 3))
    pot = POTScorer(no_peaks="zero", min_peaks=1, threshold="order_statistic", progress=False).fit(ref)
    np.testing.assert_array_equal(pot.thresholds.numpy(), np.sort(ref, axis=0)[int(0.9 * 57)])
    assert pot.fitted.all()


def test_state_dict_round_trip(fitted):
    ref, pot = fitted
    again = POTScorer.from_state_dict(pot.state_dict())
    s = ref[:50]
    np.testing.assert_array_equal(again.tail_probability(s).numpy(), pot.tail_probability(s).numpy())
    deg = POTScorer(progress=False).fit(_with_degenerate_filter())
    s2 = np.array([[3.0, 1.0]])
    np.testing.assert_array_equal(
        POTScorer.from_state_dict(deg.state_dict()).tail_probability(s2).numpy(), deg.tail_probability(s2).numpy()
    )


def test_bad_inputs(fitted):
    _, pot = fitted
    with pytest.raises(ValueError, match="not fitted"):
        POTScorer().tail_probability(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="fitted on 3"):
        pot.tail_probability(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        POTScorer(progress=False).fit(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        POTScorer(progress=False).fit(np.zeros((1, 2)))
    with pytest.raises(TypeError, match="numpy"):
        POTScorer(progress=False).fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="quantile"):
        POTScorer(quantile=1.0)
    with pytest.raises(ValueError, match="no_peaks"):
        POTScorer(no_peaks="ignore")
    with pytest.raises(ValueError, match="threshold"):
        POTScorer(threshold="median")
    with pytest.raises(ValueError, match="k must"):
        pot.rank(np.zeros((1, 3)), k=0)
