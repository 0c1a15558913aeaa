"""Figures: the methods x layers grid (Figure-1 layout) and the sanity-check plots, written as PNG."""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam, LayerGradientXActivation
from PIL import Image
from torch import nn

import captum_normgrad
from captum_normgrad import LayerNormGrad
from captum_normgrad.sanity import model_parameter_randomization
from captum_normgrad.viz import (
    compute_attribution_grid,
    plot_attribution_grid,
    plot_randomization,
    plot_randomization_maps,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()


def check_png(path: pathlib.Path) -> np.ndarray:
    assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 1.0  # not a blank canvas
    return img


def test_grid_of_methods_by_layers_is_written_as_png(tmp_path: pathlib.Path) -> None:
    net = make_net()
    x = torch.rand(2, 3, 16, 16)
    maps = compute_attribution_grid(
        net, x,
        {"NormGrad": LayerNormGrad, "Grad-CAM": (LayerGradCam, {"relu_attributions": True}),
         "GxA": LayerGradientXActivation},
        ["1", "3"], target=2,
    )
    assert list(maps) == ["NormGrad", "Grad-CAM", "GxA"] and list(maps["NormGrad"]) == ["1", "3"]
    assert maps["NormGrad"]["1"].shape == (2, 1, 16, 16) and maps["NormGrad"]["3"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(maps["NormGrad"]["3"], LayerNormGrad(net, net[3]).attribute(x, target=2))
    path = tmp_path / "sub" / "figure1.png"
    fig = plot_attribution_grid(x, maps, path, sample=1, title="class 2")
    img = check_png(path)
    axes = fig.get_axes()
    assert len(axes) == 3 * (1 + 2)  # rows = methods, columns = image + layers
    assert [a.get_title() for a in axes[:3]] == ["image", "1", "3"]
    assert [axes[3 * i].get_ylabel() for i in range(3)] == ["NormGrad", "Grad-CAM", "GxA"]
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert plt.get_fignums() == []  # never registered with pyplot


def test_zero_signed_and_missing_cells(tmp_path: pathlib.Path) -> None:
    image = np.random.default_rng(0).random((12, 12, 3))  # (H, W, C) array
    maps = {
        "zero": {"a": torch.zeros(1, 1, 3, 3), "b": torch.rand(1, 1, 6, 6)},
        "signed": {"a": torch.randn(1, 1, 3, 3)},
    }
    fig = plot_attribution_grid(image, maps, tmp_path / "g.png", show_image=False)
    check_png(tmp_path / "g.png")
    titles = [a.get_title() for a in fig.get_axes()]
    assert titles[0] == "a\n(zero map)"
    assert not fig.get_axes()[3].axison  # "signed" has no map for layer "b": blank cell


def test_randomization_plots(tmp_path: pathlib.Path) -> None:
    net = make_net()
    res = model_parameter_randomization(net, LayerNormGrad, "2", torch.rand(2, 3, 16, 16))
    fig = res.plot(str(tmp_path / "mprt.png"))
    check_png(tmp_path / "mprt.png")
    ax = fig.get_axes()[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == res.modules
    assert len(ax.get_lines()) == 4 + 1  # four measures + the zero line
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), res.mean()["spearman_abs"])
    plot_randomization_maps(res, tmp_path / "maps.png")
    check_png(tmp_path / "maps.png")
    with pytest.raises(ValueError, match="unknown measures"):
        plot_randomization(res, measures=["pearson"])
    res.randomized_maps = None
    with pytest.raises(ValueError, match="keep_maps"):
        plot_randomization_maps(res)


def test_save_figure_and_bad_inputs(tmp_path: pathlib.Path) -> None:
    fig = plot_attribution_grid(torch.rand(3, 8, 8), {"m": {"l": torch.rand(8, 8)}})
    out = save_figure(fig, tmp_path / "deep" / "x.png", dpi=50)
    check_png(pathlib.Path(out))
    net = make_net()
    with pytest.raises(ValueError, match="empty"):
        plot_attribution_grid(torch.rand(3, 8, 8), {})
    with pytest.raises(ValueError, match="image must be"):
        plot_attribution_grid(torch.rand(5, 8, 8), {"m": {"l": torch.rand(8, 8)}})
    with pytest.raises(ValueError, match="no layer named 'layer9'"):
        compute_attribution_grid(net, torch.rand(1, 3, 8, 8), {"NG": LayerNormGrad}, ["layer9"])
    with pytest.raises(ValueError, match="non-empty list"):
        compute_attribution_grid(net, torch.rand(1, 3, 8, 8), {"NG": LayerNormGrad}, [])
    with pytest.raises(ValueError, match="methods is empty"):
        compute_attribution_grid(net, torch.rand(1, 3, 8, 8), {}, ["1"])


def test_matplotlib_is_imported_only_by_viz() -> None:
    root = pathlib.Path(captum_normgrad.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "viz.py" and p.parts[-2] != "benchmarks"
        and any(line.lstrip().startswith(("import matplotlib", "from matplotlib")) for line in p.read_text().splitlines())
    ]
    # faces (cli/demo) may draw through viz; tools and below must not import matplotlib themselves
    tools_and_below = [o for o in offenders if o.split("/")[0] in ("metrics", "sanity.py", "quantus_bridge.py",
                                                                   "normgrad.py", "_maps.py", "_capture.py")]
    assert tools_and_below == []
