"""Regenerate the figures of the documentation (docs/img/*.png).

    python scripts/make_doc_figures.py [--out docs/img] [--allow-random]

Uses the package's benchmark VGG (``captum_normgrad.models.load_benchmark_model("vgg")``, weights
trained by ``benchmarks/train_models.py``) on the generated test images, and writes:

- ``normgrad-depths.png``: Grad-CAM vs NormGrad order 0 at the end of each block (methods/normgrad.md);
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
from typing import List

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from captum_normgrad.demo import compute_demo, plot_figure1
from captum_normgrad.explain import compute_maps
from captum_normgrad.io import overlay

ROOT = Path(__file__).resolve().parents[1]


def _model(allow_random: bool):
    from captum_normgrad.models import benchmark_layers, build_benchmark_model, load_benchmark_model

    try:
        return load_benchmark_model("vgg"), True
    except FileNotFoundError as e:
        if not allow_random:
            sys.exit(f"make_doc_figures: {e} (or pass --allow-random for placeholder figures)")
        torch.manual_seed(0)
        return build_benchmark_model("vgg").eval(), False


def _stamp(fig: Figure, trained: bool, title: str) -> None:
    fig.suptitle(title + ("" if trained else "\nRANDOM WEIGHTS (untrained placeholder)"), fontsize=8,
                 color="black" if trained else "red")


def _new(rows: int, cols: int, cell: float = 1.7):
    fig = Figure(figsize=(cell * cols, cell * rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def depths_figure(model, trained: bool, out: Path, n_images: int = 2) -> Path:
    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.models import benchmark_layers

    layers = benchmark_layers(model)
    images, labels, _ = ShapesDataset(n_images, split="test").tensors()
    rows: List[tuple] = [("gradcam", "Grad-CAM"), ("normgrad", "NormGrad")]
    maps = {m: compute_maps(m, model, list(layers.values()), images, labels) for m, _ in rows}
    fig, axes = _new(n_images * len(rows), len(layers) + 1)
    for i in range(n_images):
        for r, (method, label) in enumerate(rows):
            row = i * len(rows) + r
            axes[row, 0].imshow(images[i].permute(1, 2, 0).numpy())
            axes[row, 0].set_ylabel(f"{label}\n{CLASS_NAMES[int(labels[i])]}", fontsize=7)
            for c, (lname, m) in enumerate(zip(layers, maps[method])):
                axes[row, c + 1].imshow(overlay(images[i], m[i, 0]).permute(1, 2, 0).numpy())
                if row == 0:
                    axes[row, c + 1].set_title(f"{lname} ({m.shape[-2]}x{m.shape[-1]})", fontsize=8)
    _stamp(fig, trained, "Grad-CAM vs NormGrad order 0 at the end of each block (benchmark VGG, true class)")
    fig.tight_layout()
    path = out / "normgrad-depths.png"
    fig.savefig(path, dpi=100)
    return path


def variant_figure(model, trained: bool, out: Path, layer: str = "block2") -> Path:
    from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset
    from captum_normgrad.models import benchmark_layers
    from captum_normgrad.normgrad import LayerNormGrad

    module = benchmark_layers(model)[layer]
    image, label, _ = ShapesDataset(1, split="test")[0]
    x = image[None]
    vls = ("conv1x1", "scaling", "bias", "conv3x3")
    aggs = ("norm", "filter_norm", "sum", "max")
    ng = LayerNormGrad(model, module)
    fig, axes = _new(len(vls), len(aggs) + 1)
    for r, vl in enumerate(vls):
        axes[r, 0].imshow(image.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(vl, fontsize=8)
        for c, agg in enumerate(aggs):
            m = ng.attribute(x, target=int(label), virtual_layer=vl, aggregation=agg)
            axes[r, c + 1].imshow(overlay(image, m[0, 0]).permute(1, 2, 0).numpy())
            if r == 0:
                axes[r, c + 1].set_title(agg, fontsize=8)
    _stamp(fig, trained, f"virtual layer (rows) x aggregation (columns) at {layer}, class {CLASS_NAMES[int(label)]}")
    fig.tight_layout()
    path = out / "variant-grid.png"
    fig.savefig(path, dpi=100)
    return path


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
