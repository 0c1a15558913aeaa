"""The reliability suite: bad inputs get a clear error, nothing is silently wrong, nothing is lost.

Runner: resume refuses (or recomputes) when the checkpoint or the images changed, a lock keeps two
runs off one output folder (stale locks taken over), torchrun workers exit when their launcher
dies, a configuration that does not fit the data fails up front, a run where every sample fails is
an error, symlinks in the output folder are never written through, a full disk fails loudly and is
resumable. Maps: NaN/Inf never pass silently through normalisation or fusion.

References are independent: hashes from ``hashlib``, maps from a plain forward/backward, the lock
held by a separate ``fcntl.flock`` process.
"""

from __future__ import annotations

import math

import pytest
import torch

from captum_normgrad import fuse_maps, normalize_maps


# ----------------------------------------------------------------------------- maps: NaN guards


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_normalize_maps_refuses_non_finite(bad: float) -> None:
    m = torch.rand(3, 1, 4, 4)
    m[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"normalize_maps: maps contain NaN or Inf values \(samples \[1\]\)"):
        normalize_maps(m)


def test_normalize_maps_refuses_bad_options_and_complex() -> None:
    m = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        normalize_maps(m, eps=math.nan)
    with pytest.raises(ValueError, match="constant_value must be a finite number"):
        normalize_maps(m, constant_value=math.nan)
    with pytest.raises(TypeError, match="complex"):
        normalize_maps(torch.rand(2, 4, dtype=torch.complex64))
    # finite maps: still the min-max reference
    ref = (m - m.amin((1, 2, 3), keepdim=True)) / (m.amax((1, 2, 3), keepdim=True) - m.amin((1, 2, 3), keepdim=True))
    torch.testing.assert_close(normalize_maps(m), ref)


def test_fuse_maps_refuses_non_finite_maps_and_weights() -> None:
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8)
    b[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fuse_maps: map 1 contain NaN or Inf values \(samples \[0\]\)"):
        fuse_maps([a, b])
    b = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="weights must be finite"):
        fuse_maps([a, b], mode="mean", weights=[1.0, math.nan])
    with pytest.raises(ValueError, match="weights must be finite"):
        fuse_maps([a, b], mode="power", weights=[math.inf, 1.0])
    assert bool(torch.isfinite(fuse_maps([a, b])).all())
