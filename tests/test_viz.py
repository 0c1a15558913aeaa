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
from captum_normgrad.evaluation import model_parameter_randomization
from captum_normgrad.viz import (
    compute_attribution_grid,
    crop_box,
    map_to_original,
    overlay_map,
    plot_attribution_grid,
    plot_comparison_grid,
    unnormalize,
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
    fig = plot_randomization(res, str(tmp_path / "mprt.png"))
    with pytest.warns(DeprecationWarning, match="plot_randomization"):
        res.plot(str(tmp_path / "mprt2.png"))  # the deprecated method still draws, for one release
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
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
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


# --------------------------------------------------------------------------- publication grid, unnormalise, crops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_unnormalize_against_hand_computation() -> None:
    x = torch.tensor([[[0.0, 1.0]], [[-2.0, 0.5]], [[2.0, -1.0]]])  # (3, 1, 2)
    got = unnormalize(x, IMAGENET_MEAN, IMAGENET_STD, clamp=False)
    expected = [[[0.485, 0.485 + 0.229]], [[0.456 - 2 * 0.224, 0.456 + 0.5 * 0.224]],
                [[0.406 + 2 * 0.225, 0.406 - 0.225]]]
    torch.testing.assert_close(got, torch.tensor(expected))
    clamped = unnormalize(x[None], IMAGENET_MEAN, IMAGENET_STD)  # batch, clamped to [0, 1]
    assert clamped.shape == (1, 3, 1, 2) and float(clamped.min()) >= 0.0 and abs(float(clamped[0, 1, 0, 0]) - 0.008) < 1e-6
    # round trip with torchvision's own normalisation
    from torchvision.transforms.functional import normalize
    img = torch.rand(3, 5, 7)
    torch.testing.assert_close(unnormalize(normalize(img, IMAGENET_MEAN, IMAGENET_STD), IMAGENET_MEAN, IMAGENET_STD), img)
    with pytest.raises(ValueError, match="one value per channel"):
        unnormalize(torch.rand(5, 5, 3), IMAGENET_MEAN, IMAGENET_STD)  # channels-last by mistake
    with pytest.raises(ValueError, match="std must be positive"):
        unnormalize(img, IMAGENET_MEAN, (0.2, 0.0, 0.2))


def test_crop_box_matches_torchvision_preprocessing() -> None:
    """Each pixel stores its own (row, col); after torchvision's resize + centre crop (nearest) the
    corners of the crop say where in the original it came from: inside crop_box's box."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    for (h, w), resize, crop in [((480, 640), 256, 224), ((640, 480), 256, 224), ((300, 451), 72, 64),
                                 ((100, 100), 80, 60)]:
        rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
        img = torch.stack([rows / 1000, cols / 1000, torch.zeros_like(rows)])
        t = ImageClassification(crop_size=crop, resize_size=resize, mean=(0, 0, 0), std=(1, 1, 1),
                                interpolation=InterpolationMode.NEAREST, antialias=False)
        out = t(img) * 1000
        top, left, bh, bw = crop_box((h, w), resize, crop)
        first_r, first_c = float(out[0, 0, 0]), float(out[1, 0, 0])
        last_r, last_c = float(out[0, -1, -1]), float(out[1, -1, -1])
        sy, sx = bh / crop, bw / crop  # one output pixel in original pixels
        assert top - 1 <= first_r <= top + sy + 0.5, (h, w, top, first_r)
        assert left - 1 <= first_c <= left + sx + 0.5, (h, w, left, first_c)
        assert top + bh - sy - 1 <= last_r <= top + bh + 0.5, (h, w, top + bh, last_r)
        assert left + bw - sx - 1 <= last_c <= left + bw + 0.5, (h, w, left + bw, last_c)
    assert crop_box((10, 20), None, 10) == (0.0, 5.0, 10.0, 10.0)
    with pytest.raises(ValueError, match="larger than the resized image"):
        crop_box((100, 100), 50, 64)


def test_map_to_original_places_the_map_in_the_crop_box() -> None:
    heat = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = map_to_original(heat, (480, 640), 256, 224)
    assert out.shape == (480, 640)
    inside = np.isfinite(out)
    r, c = np.where(inside)
    assert (r.min(), r.max() + 1, c.min(), c.max() + 1) == (30, 450, 109, 529)
    assert inside.sum() == 420 * 420  # exactly the box, NaN elsewhere
    # bilinear upsampling of a 2x2 map onto the box, as torch does it
    ref = torch.nn.functional.interpolate(heat.double(), size=(420, 420), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out[30:450, 109:529], ref[0, 0].numpy())
    full = map_to_original(torch.ones(3, 3), (9, 6))  # no preprocessing geometry: the whole image
    assert np.isfinite(full).all() and full.shape == (9, 6)
    with pytest.raises(ValueError, match="2-D"):
        map_to_original(torch.ones(2, 2, 3, 3), (9, 6))


def _colorbar_axes(fig) -> list:
    return [a for a in fig.get_axes() if a.get_label() == "<colorbar>"]


def test_comparison_grid_reads_back(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    photo = (np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8)  # a landscape "photograph"
    x_norm = torch.randn(2, 3, 32, 32)  # normalised model inputs, shown unnormalised
    maps = {
        "NormGrad": {"block1": torch.rand(2, 1, 16, 16), "block2": torch.rand(2, 1, 8, 8)},
        "GxA": {"block1": torch.randn(2, 1, 16, 16)},  # signed, and no block2 map
    }
    path = tmp_path / "grid.png"
    fig = plot_comparison_grid(x_norm, maps, path, captions=["cat (p=0.91)", "dog (p=0.40)"],
                               mean=IMAGENET_MEAN, std=IMAGENET_STD, cmap="magma", alpha=0.7, dpi=100)
    img = check_png(path)
    # 2 images x 2 methods rows, image + 2 layer columns, and one colour bar per row
    grid_axes = [a for a in fig.get_axes() if a.get_label() != "<colorbar>"]
    assert len(grid_axes) == 4 * 3
    bars = _colorbar_axes(fig)
    assert len(bars) == 4
    assert img.shape[1] > 400 and img.shape[0] > 600  # legible at the saved size
    assert grid_axes[0].get_title() == "cat (p=0.91)" and grid_axes[6].get_title() == "dog (p=0.40)"
    assert [grid_axes[3 * k + 1].get_ylabel() for k in range(4)] == ["NormGrad", "GxA", "NormGrad", "GxA"]
    # the image column shows the unnormalised image (hand computation), not the normalised tensor
    shown = np.asarray(grid_axes[6].get_images()[0].get_array())
    expected = (x_norm[1] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    np.testing.assert_allclose(shown, expected.clamp(0, 1).permute(1, 2, 0).numpy(), atol=1e-6)
    # overlay options reach the drawn map; the signed row gets a symmetric [-1, 1] bar
    heat = grid_axes[1].get_images()[1]
    assert heat.get_cmap().name == "magma" and heat.get_alpha() == 0.7
    assert grid_axes[4].get_images()[1].get_cmap().name == "RdBu_r"  # the signed row: diverging colour map
    lims = sorted((round(b.get_ylim()[0], 3), round(b.get_ylim()[1], 3)) for b in bars)
    assert lims == [(-1.0, 1.0), (-1.0, 1.0), (0.0, 1.0), (0.0, 1.0)]
    assert "no map" in [t.get_text() for t in grid_axes[5].texts]
    assert plt.get_fignums() == []


def test_comparison_grid_on_an_uncropped_photo(tmp_path: pathlib.Path) -> None:
    photo = np.zeros((60, 90, 3), np.uint8)
    photo[:, :45] = 255  # left half white: a normalisation mistake would tint it
    heat = torch.zeros(1, 1, 4, 4)
    heat[0, 0, 0, 0] = 1.0
    fig = plot_comparison_grid([photo], {"m": {"l": heat}}, tmp_path / "p.png", geometry=[(40, 32)],
                               scale="shared", dpi=80)
    check_png(tmp_path / "p.png")
    ax_img, ax_map = [a for a in fig.get_axes() if a.get_label() != "<colorbar>"]
    np.testing.assert_allclose(np.asarray(ax_img.get_images()[0].get_array()), photo / 255.0)
    drawn = np.ma.getmaskarray(ax_map.get_images()[1].get_array())
    top, left, bh, bw = crop_box((60, 90), 40, 32)
    r, c = np.where(~drawn)  # coloured pixels: exactly the crop box
    assert (r.min(), r.max() + 1) == (round(top), round(top + bh))
    assert (c.min(), c.max() + 1) == (round(left), round(left + bw))
    assert len(ax_map.patches) == 1  # the crop box outline
    assert len(_colorbar_axes(fig)) == 1  # one shared colour bar


def test_comparison_grid_bad_inputs() -> None:
    maps = {"m": {"l": torch.rand(1, 1, 4, 4)}}
    with pytest.raises(ValueError, match="unknown colour map"):
        plot_comparison_grid(torch.rand(3, 8, 8), maps, cmap="viridiss")
    with pytest.raises(ValueError, match="alpha"):
        plot_comparison_grid(torch.rand(3, 8, 8), maps, alpha=1.5)
    with pytest.raises(ValueError, match="one caption per image"):
        plot_comparison_grid(torch.rand(3, 8, 8), maps, captions=["a", "b"])
    with pytest.raises(ValueError, match="1 maps for 2 images"):
        plot_comparison_grid(torch.rand(2, 3, 8, 8), maps)
    with pytest.raises(ValueError, match="both mean and std"):
        plot_comparison_grid(torch.rand(3, 8, 8), maps, mean=IMAGENET_MEAN)
    with pytest.raises(ValueError, match="scale"):
        plot_comparison_grid(torch.rand(3, 8, 8), maps, scale="global")


def test_overlay_map_against_hand_blend() -> None:
    from matplotlib import colormaps

    img = np.full((20, 30, 3), 0.5)
    heat = torch.zeros(2, 2)
    heat[1, 1] = 4.0
    out = overlay_map(img, heat, geometry=(20, 20), alpha=0.25, dim_outside=0.4)  # crop: the 20 x 20 middle
    m = map_to_original(heat, (20, 30), 20, 20) / 4.0
    inside = np.isfinite(m)
    assert inside.sum() == 400 and inside[:, 5:25].all()
    expected = 0.75 * 0.5 + 0.25 * colormaps["viridis"](np.nan_to_num(m))[..., :3]
    np.testing.assert_allclose(out[inside], expected[inside])
    np.testing.assert_allclose(out[~inside], 0.5 * 0.6)  # the part the model never saw: darkened, not coloured
    signed = overlay_map(img, -heat, alpha=1.0)  # signed map: the diverging colour map, 0 at its centre
    ref = colormaps["RdBu_r"]((map_to_original(-heat, (20, 30)) / 4.0 + 1.0) / 2.0)[..., :3]
    np.testing.assert_allclose(signed, ref)
    with pytest.raises(ValueError, match="unknown colour map"):
        overlay_map(img, heat, cmap="nope")
