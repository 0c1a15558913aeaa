"""The Quantus bridge: an explain_func that finds its layer by name on the model Quantus passes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from captum_normgrad import LayerNormGrad
from captum_normgrad.evaluation.quantus_bridge import make_explain_func

quantus = pytest.importorskip("quantus")


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


def make_net() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def data(n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(n, 1, size, size, generator=g)
    y = np.arange(n) % 3
    return x, y


def test_explain_func_returns_upsampled_numpy_maps() -> None:
    net = make_net()
    x, y = data()
    explain = make_explain_func(LayerNormGrad, "conv2")
    a = explain(net, x.numpy(), y)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (3, 1, 16, 16)
    ref = LayerNormGrad(net, net.conv2).attribute(x, target=torch.as_tensor(y))
    ref = F.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(a, ref.detach().numpy(), rtol=1e-5, atol=1e-7)
    gc = make_explain_func(LayerGradCam, "conv2", attribute_kwargs={"relu_attributions": True}, upsample=False)(
        net, x.numpy(), y
    )
    exp = LayerGradCam(net, net.conv2).attribute(x, target=torch.as_tensor(y), relu_attributions=True)
    np.testing.assert_allclose(gc, exp.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_layer_is_looked_up_on_the_model_it_is_given() -> None:
    net = make_net()
    x, y = data(2)
    explain = make_explain_func(LayerNormGrad, "conv2")
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.conv1.weight.mul_(-1.5)
    a_twin = explain(twin, x.numpy(), y)
    ref = LayerNormGrad(twin, twin.conv2).attribute(x, target=torch.as_tensor(y))
    ref = F.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False).detach().numpy()
    np.testing.assert_allclose(a_twin, ref, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a_twin, explain(net, x.numpy(), y))


def test_quantus_pointing_game_agrees_with_direct_argmax() -> None:
    net = make_net()
    x, y = data(4)
    s = np.zeros((4, 1, 16, 16), dtype=np.float32)
    s[:, :, 2:10, 3:12] = 1.0
    explain = make_explain_func(LayerNormGrad, "conv2")
    scores = quantus.PointingGame(disable_warnings=True)(
        model=net, x_batch=x.numpy(), y_batch=y, s_batch=s, explain_func=explain
    )
    a = explain(net, x.numpy(), y).reshape(4, -1)
    exp = [bool(s[i].reshape(-1)[a[i] == a[i].max()].any()) for i in range(4)]
    assert [bool(v) for v in scores] == exp


def test_quantus_mprt_randomises_copies_and_explains_them() -> None:
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = data(2)
    calls = []
    explain = make_explain_func(LayerNormGrad, "conv2")

    def spy(model, inputs, targets, **kw):
        calls.append(model)
        return explain(model, inputs, targets, **kw)

    res = quantus.MPRT(disable_warnings=True)(model=net, x_batch=x.numpy(), y_batch=y, explain_func=spy)
    assert list(res) == ["original", "fc", "conv2", "conv1"]  # top-down over parameterised layers
    assert res["original"] == pytest.approx([1.0, 1.0])
    assert all(np.isfinite(v).all() for v in res.values())
    assert max(res["conv1"]) < 0.999  # all randomised: the explanation changed
    assert any(m is not net for m in calls)  # Quantus explained its own deep copies
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_inputs() -> None:
    net = make_net()
    x, y = data(2)
    with pytest.raises(TypeError, match="layer name"):
        make_explain_func(LayerNormGrad, net.conv2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown layer 'layer3'.*conv2"):
        make_explain_func(LayerNormGrad, "layer3")(net, x.numpy(), y)
    with pytest.raises(ValueError, match="batch sizes differ"):
        make_explain_func(LayerNormGrad, "conv2")(net, x.numpy(), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="reduce_channels"):
        make_explain_func(LayerNormGrad, "conv2", reduce_channels="max")
    with pytest.raises(TypeError, match="attribution class"):
        make_explain_func("LayerNormGrad", "conv2")  # type: ignore[arg-type]
