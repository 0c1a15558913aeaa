"""Pointing game (TorchRay protocol) and energy-based pointing game on maps whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.evaluation import (
    boxes_to_masks,
    energy_pointing_game,
    pointing_accuracy,
    pointing_game,
    pointing_game_hits,
    pointing_points,
)


def brute_force_hit(point, mask: np.ndarray, tol: float) -> bool:
    """Reference: some mask pixel strictly within ``tol`` px of the point (explicit loop)."""
    r, c = point
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[i, j] and (i - r) ** 2 + (j - c) ** 2 < tol**2:
                return True
    return False


def one_hot_map(n: int, h: int, w: int, points) -> torch.Tensor:
    m = torch.rand(n, 1, h, w) * 0.5
    for i, (r, c) in enumerate(points):
        m[i, 0, r, c] = 1.0
    return m


@given(
    data=st.data(),
    tol=st.sampled_from([1, 3, 5, 15]),
)
def test_hits_match_brute_force(data, tol: int) -> None:
    h, w, n = 20, 24, 3
    pts = [(data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))) for _ in range(n)]
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        r0, c0 = data.draw(st.integers(0, h - 2)), data.draw(st.integers(0, w - 2))
        r1, c1 = data.draw(st.integers(r0 + 1, h)), data.draw(st.integers(c0 + 1, w))
        masks[i, r0:r1, c0:c1] = True
    maps = one_hot_map(n, h, w, pts)
    hits = pointing_game_hits(maps, masks, tolerance=tol)
    exp = [brute_force_hit(pts[i], masks[i].numpy(), tol) for i in range(n)]
    assert hits.tolist() == exp
    assert pointing_points(maps, (h, w)).tolist() == [list(p) for p in pts]


def test_tolerance_is_strict_like_torchray() -> None:
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 0, 0] = True
    at_15 = one_hot_map(1, 40, 40, [(0, 15)])
    at_14 = one_hot_map(1, 40, 40, [(0, 14)])
    assert not pointing_game_hits(at_15, mask).item()  # d = 15 is not < 15
    assert pointing_game_hits(at_14, mask).item()
    assert pointing_game_hits(at_15, mask, tolerance=15.5).item()
    inside = one_hot_map(1, 40, 40, [(0, 0)])
    assert pointing_game_hits(inside, mask, tolerance=0).item()
    assert not pointing_game_hits(at_14, mask, tolerance=0).item()


def test_argmax_after_bilinear_upsampling_and_first_maximum_on_ties() -> None:
    # a smooth bump centred on layer cell (1, 2) of a 4x4 map -> image argmax inside that cell's block
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    m = torch.exp(-((yy - 1) ** 2 + (xx - 2) ** 2))[None, None]
    r, c = pointing_points(m, (32, 32))[0].tolist()
    assert 8 <= r < 16 and 16 <= c < 24
    # ties: the first maximum in row-major order, as torch.argmax / TorchRay
    flat = torch.zeros(1, 1, 5, 5)
    flat[0, 0, 3, 1] = flat[0, 0, 2, 4] = 1.0
    assert pointing_points(flat, (5, 5)).tolist() == [[2, 4]]


def test_pointing_game_is_mean_of_per_class_hit_rates() -> None:
    h = w = 30
    masks = torch.zeros(5, h, w, dtype=torch.bool)
    masks[:, :10, :10] = True
    near, far = (2, 2), (28, 28)
    pts = [near, far, far, near, near]  # class 0: hit, miss, miss ; class 1: hit, hit
    labels = [0, 0, 0, 1, 1]
    res = pointing_game(one_hot_map(5, h, w, pts), masks, labels, tolerance=3)
    assert res.hits.tolist() == [True, False, False, True, True]
    assert res.class_accuracies == {0: pytest.approx(1 / 3), 1: 1.0}
    assert res.accuracy == pytest.approx((1 / 3 + 1.0) / 2)  # not the pooled 3/5
    acc, per = pointing_accuracy(res.hits, labels)
    assert acc == pytest.approx(res.accuracy) and per == res.class_accuracies
    assert pointing_game(one_hot_map(5, h, w, pts), masks, tolerance=3).accuracy == pytest.approx(3 / 5)


def test_signed_maps_are_fine_for_the_pointing_game() -> None:
    m = -torch.ones(1, 1, 6, 6)
    m[0, 0, 4, 4] = -0.1  # the maximum of a negative map
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 4, 4] = True
    assert pointing_game_hits(m, mask, tolerance=1).item()


def test_normgrad_points_at_the_bright_object() -> None:
    """End to end: a model whose NormGrad map is proportional to local brightness."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[4].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    x = 0.05 * torch.rand(4, 1, 16, 16)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    for i, (r, c) in enumerate([(2, 2), (10, 3), (4, 11), (11, 11)]):
        x[i, 0, r : r + 3, c : c + 3] += 1.0
        masks[i, 4 * r : 4 * r + 12, 4 * c : 4 * c + 12] = True
    maps = LayerNormGrad(net, net[1]).attribute(x, target=0)  # (4, 1, 16, 16)
    res = pointing_game(maps, masks, tolerance=1)
    assert res.accuracy == 1.0
    far = torch.roll(masks, shifts=(32, 32), dims=(1, 2))
    assert pointing_game(maps, far, tolerance=1).accuracy == 0.0


# --------------------------------------------------------------------------- energy-based


def test_energy_matches_hand_values() -> None:
    m = torch.tensor([[[[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]]], [[[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]]])
    masks = torch.tensor(
        [[[True, True, False], [False, False, False]], [[True, True, True], [True, True, False]]]
    )
    torch.testing.assert_close(energy_pointing_game(m, masks), torch.tensor([3 / 10, 0.0]))
    torch.testing.assert_close(energy_pointing_game(m, ~masks), torch.tensor([7 / 10, 1.0]))


def test_energy_of_a_constant_map_is_the_mask_area_after_upsampling() -> None:
    m = torch.full((2, 1, 4, 4), 0.7)
    masks = boxes_to_masks(torch.tensor([[0, 0, 16, 8], [4, 4, 28, 28]]), (32, 32))
    torch.testing.assert_close(energy_pointing_game(m, masks), torch.tensor([16 * 8 / 1024, 24 * 24 / 1024]))


def test_energy_signed_maps_raise_by_default_and_clip_or_abs_on_request() -> None:
    m = torch.tensor([[[[2.0, -6.0], [1.0, 1.0]]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    with pytest.raises(ValueError, match="non-negative"):
        energy_pointing_game(m, mask)
    torch.testing.assert_close(energy_pointing_game(m, mask, negative="clip"), torch.tensor([2 / 4]))
    torch.testing.assert_close(energy_pointing_game(m, mask, negative="abs"), torch.tensor([8 / 10]))
    with pytest.raises(ValueError, match="negative"):
        energy_pointing_game(m, mask, negative="shift")
    zero = torch.zeros(1, 1, 2, 2)
    assert energy_pointing_game(zero, mask).item() == 0.0  # no mass: nothing inside


def test_boxes_to_masks_union_and_clipping() -> None:
    got = boxes_to_masks([torch.tensor([[0, 0, 2, 1], [3, 2, 9, 9]])], (4, 5))
    exp = torch.zeros(1, 4, 5, dtype=torch.bool)
    exp[0, 0, 0:2] = True
    exp[0, 2:4, 3:5] = True
    assert torch.equal(got, exp)
    with pytest.raises(ValueError, match="empty"):
        boxes_to_masks(torch.tensor([[2, 2, 2, 5]]), (4, 4))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        boxes_to_masks(torch.tensor([1, 2, 3, 4]), (4, 4))


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    maps = torch.rand(2, 1, 4, 4)
    good = torch.ones(2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="batch sizes differ"):
        pointing_game_hits(maps, torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must have shape"):
        pointing_game_hits(maps, torch.ones(2, 2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must have shape"):
        energy_pointing_game(maps, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 and 1"):
        pointing_game_hits(maps, torch.full((2, 8, 8), 0.5))
    empty = good.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"samples \[1\] are empty"):
        pointing_game_hits(maps, empty)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game_hits(maps, good, tolerance=-1)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game_hits(torch.full((2, 1, 4, 4), float("nan")), good)
    with pytest.raises(TypeError, match="fuse_maps"):
        pointing_game_hits([maps, maps], good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maps must have shape"):
        pointing_game_hits(torch.rand(2, 16), good)
    with pytest.raises(ValueError, match="one class per explained map"):
        pointing_accuracy(torch.tensor([True, False]), [0])


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), -1.0, True, "15"])
def test_non_finite_or_invalid_tolerance_is_refused(tol) -> None:
    # tolerance=NaN used to pass: ``d2 < nan`` is False, so every sample became a silent miss
    maps = torch.zeros(2, 1, 8, 8)
    maps[:, 0, 2, 2] = 1.0
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:6, 4:6] = True
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        pointing_game(maps, masks, tolerance=tol)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        pointing_game_hits(maps, masks, tolerance=tol)
