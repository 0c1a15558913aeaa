"""The demo states a verdict per Figure-1 claim next to its own numbers (issue #11)."""

from __future__ import annotations

import torch

from captum_normgrad.demo import DEMO_METHODS, DemoResult, claim_verdicts


def _result(shares):
    e = torch.empty(0)
    return DemoResult(e, e, e, e, e, {}, shares, [], "test", True, 0.0)


def test_verdicts_follow_the_numbers() -> None:
    (g, _), (o0, _), (o1, _), (adv, _) = DEMO_METHODS
    shares = {
        g: {"b1": (0.2, 0.1), "b2": (0.5, 0.1)},
        o0: {"b1": (0.3, 0.3), "b2": (0.3, 0.2)},          # ratios 1.0, 1.5: not selective -> claim 2 holds
        o1: {"b1": (0.2, 0.25), "b2": (0.6, 0.2)},         # 0.8, 3.0: selective at b2 only; b1 below order 0
        adv: {"b1": (0.1, 0.3), "b2": (0.2, 0.4)},         # other > explained everywhere -> claim 4 holds
    }
    text = "\n".join(claim_verdicts(_result(shares)))
    assert "claim 2, order 0 highlights both objects: holds (ratio explained/other per layer 1.00/1.50)" in text
    assert "claim 3, order 1 highlights the explained object: holds at some layers only (ratio 0.80/3.00)" in text
    assert "remaining gradient at theta' shrinks there" in text  # b1: order 1 below order 0
    assert "claim 4, the adversarial map highlights the other object: holds (ratio 0.33/0.50)" in text
    assert "claim 3 does NOT hold" in text  # the full benchmark's verdict is always stated
    shares[o1] = {"b1": (0.3, 0.3), "b2": (0.3, 0.2)}
    shares[adv] = {"b1": (0.3, 0.1), "b2": (0.3, 0.1)}
    text = "\n".join(claim_verdicts(_result(shares)))
    assert "claim 3, order 1 highlights the explained object: does NOT hold (ratio 1.00/1.50)" in text
    assert "claim 4, the adversarial map highlights the other object: does NOT hold" in text
    assert "shrinks there" not in text
