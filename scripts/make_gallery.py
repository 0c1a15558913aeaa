"""Regenerate the figures of the gallery page (docs/gallery.md): docs/img/gallery-*.png.

    python scripts/make_gallery.py [--out docs/img] [--report-screenshot]

Every map comes from the package's *trained* benchmark models (``captum_normgrad.models``; weights in
captum_normgrad/assets, trained by benchmarks/train_models.py on 64-px generated shapes). Without
them the script stops: random-init maps are never presented as meaningful.

- ``gallery-single.png``: benchmark VGG, two single-object test images, Grad-CAM / NormGrad order 0 /
  order 1 at the end of each block (:func:`captum_normgrad.viz.plot_comparison_grid`);
- ``gallery-two-objects.png``: benchmark ResNet, one two-object test image explained for each of
  its two classes: order 0 vs order 1 (class selectivity);
- ``gallery-photos.png``: ``skimage.data`` photographs through the image path (load, resize and
  centre crop, maps placed back on the uncropped photograph). The benchmark model only knows
  generated shapes, so these maps show the mechanics, not what the network "sees" in a cat;
- ``gallery-normalisation.png``: why overlays need :func:`captum_normgrad.viz.unnormalize`;
- ``gallery-report.png`` (with ``--report-screenshot``, needs Playwright and Chromium): the HTML
  report of an ``explain`` run on generated images with masks.

Deterministic (fixed seeds, fixed test images, one thread): same weights, same pixels. About 20 s on
one CPU core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"gradcam_relu": "Grad-CAM", "normgrad": "NormGrad order 0", "normgrad_order1": "NormGrad order 1"}


def _trained(name: str):
    from captum_normgrad.models import benchmark_layers, load_benchmark_model

    try:
        model = load_benchmark_model(name)
    except FileNotFoundError as e:
        sys.exit(f"make_gallery: {e}; the gallery shows trained models only (run benchmarks/train_models.py)")
    return model, benchmark_layers(model)


def _maps(model, layers: Dict[str, torch.nn.Module], x: torch.Tensor, target: torch.Tensor,
          methods: Dict[str, str]) -> Dict[str, Dict[str, torch.Tensor]]:
    from captum_normgrad.explain import compute_maps

    out = {}
    for name, label in methods.items():
        per_layer = compute_maps(name, model, list(layers.values()), x, target)
        out[label] = {f"{lname} ({m.shape[-1]} px)": m for lname, m in zip(layers, per_layer)}
    return out


def single_objects(out: Path) -> Path:
    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.viz import plot_comparison_grid, save_figure

    model, layers = _trained("vgg")
    ds = ShapesDataset(6, split="test")
    picks = [0, 3]
    x = torch.stack([ds[i][0] for i in picks])
    y = torch.tensor([ds[i][1] for i in picks])
    with torch.no_grad():
        p = model(x).softmax(1)
    caps = [f"{CLASS_NAMES[int(y[k])]} (p={float(p[k, y[k]]):.2f})" for k in range(len(picks))]
    fig = plot_comparison_grid(x, _maps(model, layers, x, y, ROWS), captions=caps,
                               title="Benchmark VGG (trained), true class explained, end of each block")
    return Path(save_figure(fig, out / "gallery-single.png", dpi=110))


def two_objects(out: Path) -> Path:
    from captum_normgrad.datasets import CLASS_NAMES, TwoObjectShapesDataset
    from captum_normgrad.viz import plot_comparison_grid, save_figure

    model, layers = _trained("resnet")
    images, labels, _ = TwoObjectShapesDataset(1, seed=2).tensors()
    x = images[:1].repeat(2, 1, 1, 1)
    y = labels[0]  # the two classes present in the image
    with torch.no_grad():
        p = model(x[:1]).softmax(1)[0]
    caps = [f"explaining {CLASS_NAMES[int(c)]} (p={float(p[c]):.2f})" for c in y]
    maps = _maps(model, layers, x, y, {"normgrad": "NormGrad order 0", "normgrad_order1": "NormGrad order 1"})
    fig = plot_comparison_grid(x, maps, captions=caps,
                               title="Benchmark ResNet (trained): one image with two objects, each class explained")
    return Path(save_figure(fig, out / "gallery-two-objects.png", dpi=110))


def _photos() -> Dict[str, np.ndarray]:
    from skimage import data

    return {"chelsea (cat)": data.chelsea(), "coffee": data.coffee()}


def photographs(out: Path) -> Path:
    from PIL import Image
    from torchvision.transforms._presets import ImageClassification

    from captum_normgrad.datasets import CLASS_NAMES
    from captum_normgrad.viz import plot_comparison_grid, save_figure

    model, layers = _trained("vgg")
    layers = {k: v for k, v in layers.items() if k in ("block2", "block3", "block4")}
    resize, crop = 72, 64  # the benchmark model's input size; a torchvision model would use 256 -> 224
    t = ImageClassification(crop_size=crop, resize_size=resize, mean=(0, 0, 0), std=(1, 1, 1))
    photos = _photos()
    x = torch.stack([t(Image.fromarray(a)) for a in photos.values()])
    with torch.no_grad():
        p = model(x).softmax(1)
    pred = p.argmax(1)
    caps = [f"{name}\nmodel says: {CLASS_NAMES[int(c)]} ({float(p[k, c]):.2f})"
            for k, (name, c) in enumerate(zip(photos, pred))]
    maps = _maps(model, layers, x, pred, {"normgrad": "NormGrad order 0"})
    fig = plot_comparison_grid(list(photos.values()), maps, captions=caps, geometry=[(resize, crop)] * len(photos),
                               title="The image path on photographs (skimage.data): resize + centre crop, maps placed "
                                     "back on the uncropped photo.\nThe model knows only 8 generated shapes: the "
                                     "maps show the mechanics, not what an ImageNet model would see.")
    return Path(save_figure(fig, out / "gallery-photos.png", dpi=110))


def normalisation(out: Path) -> Path:
    from PIL import Image
    from torchvision.transforms._presets import ImageClassification

    from captum_normgrad.viz import _new_figure, crop_box, save_figure, unnormalize

    photo = _photos()["chelsea (cat)"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = ImageClassification(crop_size=224, resize_size=256, mean=mean, std=std)
    x = t(Image.fromarray(photo))
    fig = _new_figure(11.0, 3.4, constrained=True)
    axes = fig.subplots(1, 3)
    from matplotlib.patches import Rectangle

    top, left, h, w = crop_box(photo.shape[:2], 256, 224)
    axes[0].imshow(photo)
    axes[0].add_patch(Rectangle((left, top), w, h, fill=False, ec="white", ls="--", lw=1.2))
    axes[0].set_title("photograph (dashed: the 224-px centre crop)", fontsize=9)
    axes[1].imshow(x.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].set_title("model input drawn as is: wrong colours", fontsize=9)
    axes[2].imshow(unnormalize(x, mean, std).permute(1, 2, 0).numpy())
    axes[2].set_title("unnormalize(model input, mean, std)", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return Path(save_figure(fig, out / "gallery-normalisation.png", dpi=110))


def report_screenshot(out: Path) -> Path:
    """The HTML report of an explain run on generated images with masks, screenshotted in Chromium."""
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from report_helpers import make_explain_run  # the same run the browser tests use

    from captum_normgrad.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        run = make_explain_run(Path(tmp))
        page_path = build_report(run["maps"], masks=run["masks"], tolerance=2,
                                 title="Saliency maps: benchmark VGG (trained), generated test images with masks")
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready='1']")
            page.select_option("#sort-key", "energy")
            page.click("#sort-dir")
            page.screenshot(path=str(out / "gallery-report.png"))
            b.close()
    return out / "gallery-report.png"


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="output folder (default: docs/img)")
    ap.add_argument("--report-screenshot", action="store_true",
                    help="also screenshot the HTML report (needs Playwright and /usr/bin/chromium)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = [single_objects, two_objects, photographs, normalisation]
    if args.report_screenshot:
        steps.append(report_screenshot)
    from tqdm.auto import tqdm

    for step in tqdm(steps, desc="gallery", unit="figure"):
        print(f"wrote {step(out)}")
    print(f"{len(steps)} figures in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
