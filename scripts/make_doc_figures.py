"""Regenerate the figures of the documentation (docs/img/*.png).

    python scripts/make_doc_figures.py [--out docs/img] [--allow-random]

Uses the package's benchmark VGG (``captum_normgrad.models.load_benchmark_model("vgg")``, weights
trained by ``benchmarks/train_models.py``) on the generated test images, and writes:

- ``normgrad-depths.png``: Grad-CAM vs NormGrad order 0 at the end of each block (methods/normgrad.md),
  drawn by :func:`captum_normgrad.viz.plot_comparison_grid` (class and probability, colour bars);
- ``figure1.png``: the paper's Figure 1 on a two-object image, as ``captum-normgrad demo`` draws it
  (methods/normgrad-order1.md);
- ``variant-grid.png``: the 4 virtual layers x 4 aggregations at block 2 (methods/variants.md).

Without trained weights it stops, unless ``--allow-random`` (then every figure is stamped
"RANDOM WEIGHTS"). Deterministic: same weights, same pixels. A few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from captum_normgrad.demo import compute_demo, plot_figure1

ROOT = Path(__file__).resolve().parents[1]


def _model(allow_random: bool):
    from captum_normgrad.models import build_benchmark_model, load_benchmark_model

    try:
        return load_benchmark_model("vgg"), True
    except FileNotFoundError as e:
        if not allow_random:
            sys.exit(f"make_doc_figures: {e} (or pass --allow-random for placeholder figures)")
        torch.manual_seed(0)
        return build_benchmark_model("vgg").eval(), False


def _title(trained: bool, title: str) -> str:
    return title + ("" if trained else "\nRANDOM WEIGHTS (untrained placeholder)")


def _save(fig, trained: bool, title: str, path: Path) -> Path:
    fig.suptitle(title, color="black" if trained else "red")  # same text, red when a placeholder
    fig.savefig(path, dpi=100)
    return path


def depths_figure(model, trained: bool, out: Path) -> Path:
    """Grad-CAM vs NormGrad at the end of each block, on one single-object test image (true class)."""
    from captum.attr import LayerGradCam

    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.normgrad import LayerNormGrad
    from captum_normgrad.viz import compute_attribution_grid, plot_comparison_grid

    image, label, _ = ShapesDataset(1, split="test")[0]
    names = list(model.block_names)
    maps = compute_attribution_grid(
        model, image[None], {"Grad-CAM": (LayerGradCam, {"relu_attributions": True}), "NormGrad": LayerNormGrad},
        names, target=int(label),
    )
    blocks = {n: f"block{i + 1} ({maps['NormGrad'][n].shape[-1]} px)" for i, n in enumerate(names)}
    maps = {m: {blocks[n]: v for n, v in row.items()} for m, row in maps.items()}
    title = _title(trained, f"Grad-CAM vs NormGrad order 0 at the end of each block (benchmark VGG), "
                            f"class {CLASS_NAMES[int(label)]}")
    with torch.no_grad():
        p = model(image[None]).softmax(1)[0, int(label)]
    fig = plot_comparison_grid(image, maps, captions=[f"{CLASS_NAMES[int(label)]} (p={float(p):.2f})"],
                               cell_size=1.9)
    return _save(fig, trained, title, out / "normgrad-depths.png")


def variant_figure(model, trained: bool, out: Path, block: int = 2) -> Path:
    """The 4 virtual layers (rows) x 4 aggregations (columns) at one block, on one test image."""
    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.normgrad import LayerNormGrad
    from captum_normgrad.viz import plot_attribution_grid

    module = dict(model.named_modules())[model.block_names[block - 1]]
    image, label, _ = ShapesDataset(1, split="test")[0]
    ng = LayerNormGrad(model, module)
    maps = {
        vl: {agg: ng.attribute(image[None], target=int(label), virtual_layer=vl, aggregation=agg)
             for agg in ("norm", "filter_norm", "sum", "max")}
        for vl in ("conv1x1", "scaling", "bias", "conv3x3")
    }
    title = _title(trained, f"virtual layer (rows) x aggregation (columns) at block{block}, "
                            f"class {CLASS_NAMES[int(label)]}")
    # per-cell colour scales (signed and non-negative aggregations side by side)
    fig = plot_attribution_grid(image, maps, None, cell_size=1.8, title=title)
    return _save(fig, trained, title, out / "variant-grid.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="output folder (default: docs/img)")
    ap.add_argument("--allow-random", action="store_true", help="placeholder figures without trained weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, trained = _model(args.allow_random)
    written = [depths_figure(model, trained, out), variant_figure(model, trained, out)]
    result = compute_demo(num_images=4)
    written.append(plot_figure1(result, out / "figure1.png"))
    for p in written:
        print(f"wrote {p}")
    print(f"{len(written)} figures in {time.perf_counter() - t0:.1f} s ({'trained' if trained else 'RANDOM'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
