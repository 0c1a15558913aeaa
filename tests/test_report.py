"""The explain run folder -> publication grids (``explain --grid``) and the HTML report
(``captum-normgrad report``), checked against independent computations on the files.

The browser side of the report (rendering, sorting, filtering) is in test_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captum_normgrad import cli
from captum_normgrad.report import build_report, load_explain_run, mask_to_model_input, score_run, write_grids
from report_helpers import LAYERS, METHODS, PAD, make_explain_run

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    return make_explain_run(tmp_path_factory.mktemp("report"))


def test_explain_records_the_preprocessing(run) -> None:
    pre = json.loads((run["maps"] / "preprocess.json").read_text())
    assert pre == {"resize_size": 64, "crop_size": [64, 64], "mean": [0.0] * 3, "std": [1.0] * 3}
    assert not list(run["maps"].glob("grid__*"))  # grids only with --grid
    r = load_explain_run(run["maps"])
    assert r.methods == list(METHODS) and r.layers == list(LAYERS) and r.geometry() == (64, (64, 64))


def test_grid_without_raw_maps_asked_saves_them(tmp_path: Path, capsys) -> None:
    """--grid draws from the raw maps: with --save png only, explain still writes the .npy it needs."""
    run = make_explain_run(tmp_path, n=1, extra_args=("--save", "png", "--grid", "--report"))
    assert (run["maps"] / "report" / "index.html").is_file()  # --report: the HTML report of the run, too
    img = np.asarray(Image.open(run["maps"] / "grid__img0.png").convert("RGB"))
    assert img.shape[0] > 600 and img.shape[1] > 600 and img.std() > 10  # legible size, not blank
    assert (run["maps"] / f"img0__normgrad__{LAYERS[0]}.npy").is_file()
    assert "1 comparison grid(s)" in capsys.readouterr().out
    assert cli.main(["explain", str(run["imgs"]), "--model", "captum_normgrad.models:ShapesVGG", "--image-size", "64",
                     "--layer", LAYERS[0], "--out", str(tmp_path / "bad"), "--grid", "--cmap", "viridiss",
                     "--quiet"]) == 1
    assert "unknown colour map 'viridiss'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_grid_places_the_map_on_the_uncropped_image(run, tmp_path: Path) -> None:
    r = load_explain_run(run["maps"])
    r.rows = r.rows[:1]
    (path,) = write_grids(r, out=tmp_path, cmap="magma", alpha=0.4)
    assert path.name == "grid__img0.png" and path.is_file()
    # the same figure, kept in memory: every map cell colours exactly the crop (the 64 middle columns)
    from captum_normgrad.viz import plot_comparison_grid

    photo = np.asarray(Image.open(r.image_path(r.rows[0])))
    maps = {m: {layer: [r.load_map(r.rows[0], m, layer)] for layer in r.layers} for m in r.methods}
    fig = plot_comparison_grid([photo], maps, geometry=[r.geometry()])
    cells = [a for a in fig.get_axes() if a.get_label() != "<colorbar>" and len(a.get_images()) == 2]
    assert len(cells) == len(METHODS) * len(LAYERS)
    for ax in cells:
        drawn = ~np.ma.getmaskarray(ax.get_images()[1].get_array())
        cols = np.where(drawn.any(0))[0]
        assert (cols.min(), cols.max() + 1) == (PAD, PAD + 64) and drawn[:, PAD:PAD + 64].all()


def _independent_scores(run, tolerance: float):
    """Pointing hit and energy from the .npy maps and the mask files, written out longhand."""
    out = {}
    for i in range(4):
        mask = np.asarray(Image.open(run["masks"] / f"img{i}.png")) > 0
        mask = mask[:, PAD:PAD + 64]  # the model's centre crop of the padded image
        for m in METHODS:
            for layer in LAYERS:
                heat = torch.from_numpy(np.load(run["maps"] / f"img{i}__{m}__{layer}.npy")).double()
                up = F.interpolate(heat[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
                flat = int(up.flatten().argmax())
                pr, pc = divmod(flat, 64)
                rr, cc = np.nonzero(mask)
                hit = bool((((rr - pr) ** 2 + (cc - pc) ** 2) < tolerance ** 2).any())
                # energy: the positive part of the map (Score-CAM's "positive mass"), upsampled
                pos = F.interpolate(heat.clamp(min=0)[None, None], size=(64, 64), mode="bilinear",
                                    align_corners=False)[0, 0].numpy()
                energy = float(pos[mask].sum() / pos.sum()) if pos.sum() > 0 else 0.0
                out[(f"img{i}", m, layer)] = (hit, energy)
    return out


@pytest.mark.parametrize("tolerance", [2, 15])
def test_scores_match_an_independent_computation(run, tolerance: float) -> None:
    got = score_run(load_explain_run(run["maps"]), run["masks"], tolerance=tolerance)
    ref = _independent_scores(run, tolerance)
    assert set(got) == set(ref)
    for key, (hit, energy) in ref.items():
        assert got[key]["hit"] == hit, key
        assert got[key]["energy"] == pytest.approx(energy, rel=1e-5, abs=1e-7), key
    if tolerance == 2:  # a strict tolerance separates methods: not everything is a hit
        assert 0 < sum(v["hit"] for v in got.values()) < len(got)


def test_mask_to_model_input_against_slicing() -> None:
    mask = np.zeros((40, 60), bool)
    mask[5:30, 2:20] = True
    np.testing.assert_array_equal(mask_to_model_input(mask, (40, (40, 40))), mask[:, 10:50])
    np.testing.assert_array_equal(mask_to_model_input(mask, None), mask)
    half = mask_to_model_input(mask, (20, (20, 20)))  # shorter side 40 -> 20, nearest, then crop 20 x 20 of 20 x 30
    np.testing.assert_array_equal(half, mask[::2, ::2][:, 5:25])


def test_report_cli_writes_a_self_contained_site(run, tmp_path: Path, capsys) -> None:
    out = tmp_path / "site"
    assert cli.main(["report", str(run["maps"]), "--masks", str(run["masks"]), "--out", str(out), "--quiet",
                     "--tolerance", "2"]) == 0
    assert "index.html" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    # no network: no remote URL, no external script or stylesheet
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)
    assert "<script src" not in page and "<link" not in page
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert len(data["cells"]) == 4 * len(METHODS) * len(LAYERS)
    for c in data["cells"]:
        assert (out / c["src"]).is_file()
    for im in data["images"]:
        assert (out / im["thumb"]).is_file()
    # the page's numbers are the scores, and the summary their means
    ref = _independent_scores(run, 2)
    for c in data["cells"]:
        hit, energy = ref[(data["images"][c["image"]]["name"], c["method"], c["layer"])]
        assert c["hit"] == hit and c["energy"] == pytest.approx(energy, rel=1e-5, abs=1e-7)
    for s in data["summary"]:
        sel = [v for k, v in ref.items() if k[1] == s["method"] and k[2] == s["layer"]]
        assert s["pointing"] == pytest.approx(np.mean([h for h, _ in sel]))
        assert s["energy"] == pytest.approx(np.mean([e for _, e in sel]))
    # the overlay of a map keeps the grey side bands the model did not see darkened, not coloured
    (src,) = [c["src"] for c in data["cells"] if data["images"][c["image"]]["name"] == "img0"
              and c["method"] == "normgrad" and c["layer"] == "features.19"]
    ov = np.asarray(Image.open(out / src).convert("RGB")).astype(int)
    band = ov[:, : PAD - 1]
    assert np.abs(band - band[..., :1]).max() <= 2 and band.mean() < 128 * 0.7  # grey, darker than 128


def test_report_without_masks_and_errors(run, tmp_path: Path, capsys) -> None:
    page = build_report(run["maps"], out=tmp_path / "r")
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert data["has_scores"] is False and all(c["hit"] is None for c in data["cells"])
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        build_report(tmp_path)
    empty = tmp_path / "nomasks"
    empty.mkdir()
    with pytest.raises(ValueError, match="no mask in .* matches"):
        build_report(run["maps"], out=tmp_path / "r2", masks=empty)
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_a_runner_run(tmp_path: Path) -> None:
    """A runner folder: images from the run's generated dataset, its masks score every map."""
    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.runner import RunOutput
    from report_helpers import make_runner_run

    folder = make_runner_run(tmp_path / "r")
    page = build_report(folder, out=tmp_path / "site", tolerance=2, max_images=5)
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page.read_text(), re.S).group(1))
    assert [im["name"] for im in data["images"]] == ["0", "1", "2", "3", "4"]  # the first 5 of 6
    assert data["methods"] == ["gradcam", "normgrad"] and data["layers"] == [LAYERS[0], LAYERS[1]]
    assert len(data["cells"]) == 5 * 3  # Grad-CAM at one layer, NormGrad at two
    ds, out = ShapesDataset(6, split="test"), RunOutput(folder)
    for c in data["cells"]:
        assert (tmp_path / "site" / c["src"]).is_file()
        k = c["image"]
        image, label, mask = ds[k]
        assert data["images"][k]["target_name"] == CLASS_NAMES[label]
        idx, maps = out.maps(f"{c['method']}/{c['layer']}")
        heat = maps[idx.tolist().index(k)][0].double()
        up = F.interpolate(heat[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        pr, pc = divmod(int(up.flatten().argmax()), 64)
        rr, cc = np.nonzero(mask.numpy())
        assert c["hit"] == bool((((rr - pr) ** 2 + (cc - pc) ** 2) < 4).any())
        pos = F.interpolate(heat.clamp(min=0)[None, None], size=(64, 64), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
        assert c["energy"] == pytest.approx(float(pos[mask.numpy()].sum() / pos.sum()), rel=1e-5)
    # the thumbnail is the dataset image itself (no normalisation in this configuration)
    thumb = np.asarray(Image.open(tmp_path / "site" / data["images"][0]["thumb"]).convert("RGB")).astype(float)
    ref = ShapesDataset(1, split="test")[0][0].permute(1, 2, 0).numpy() * 255
    assert np.abs(thumb - ref).max() <= 1.0
    with pytest.raises(ValueError, match="--masks is for explain runs"):
        build_report(folder, out=tmp_path / "x", masks=tmp_path)


def test_describe_preprocess_and_missing_geometry(run, tmp_path: Path) -> None:
    import shutil

    import torchvision

    from captum_normgrad.report import describe_preprocess

    t = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # no download: the preset only
    assert describe_preprocess(t, t.mean, t.std) == {
        "resize_size": 232, "crop_size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert describe_preprocess(lambda im: im, (0.5,) * 3, (0.5,) * 3) is None  # a custom transform
    old = tmp_path / "old"
    shutil.copytree(run["maps"], old)
    (old / "preprocess.json").unlink()
    with pytest.warns(UserWarning, match="no preprocess.json"):
        r = load_explain_run(old)
    assert r.geometry() is None
