r"""The built-in demo behind ``captum-normgrad demo``: the NormGrad paper's Figure 1, on a CPU.

The paper (Rebuffi et al., 2020, Figure 1) explains an image holding a cat and a dog with
Grad-CAM, NormGrad order 0, order 1 and the adversarial order-1 map at the end of every block of
VGG-16. The demo does the same with the package's benchmark model (``ShapesVGG`` trained on the
generated shapes, :mod:`captum_normgrad.models`) on generated images with two objects of different
classes (:class:`captum_normgrad.datasets.TwoObjectShapesDataset`), whose pixel masks are known, so
the figure comes with numbers: for each method and depth, the share of the map's positive energy
on the explained object and on the other object, averaged over a few images.

Outputs (in ``out``): ``figure1.png`` (the grid for one image), ``maps.pt`` (the raw maps of every
image), ``summary.json`` and ``summary.txt`` (the energy shares).

When the benchmark weights are not available (before ``benchmarks/train_models.py`` has been run)
the model is randomly initialised and the summary says so; the maps are then not meaningful.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEMO_METHODS", "DemoResult", "compute_demo", "energy_shares", "plot_figure1", "run_demo"]

#: (name in :data:`captum_normgrad.registry.METHODS`, row label) of the figure's rows. Grad-CAM is
#: the paper's, with the ReLU (``gradcam_relu``).
DEMO_METHODS: Tuple[Tuple[str, str], ...] = (
    ("gradcam_relu", "Grad-CAM"),
    ("normgrad", "NormGrad order 0"),
    ("normgrad_order1", "NormGrad order 1"),
    ("normgrad_order1_adversarial", "order 1, adversarial"),
)
_DEMO_METHOD_NAMES: Tuple[str, ...] = tuple(name for name, _ in DEMO_METHODS)


@dataclass
class DemoResult:
    """Everything the demo computed (see :func:`compute_demo`).

    Attributes:
        images (Tensor): ``(N, 3, H, W)`` images in ``[0, 1]``.
        masks (Tensor): ``(N, 2, H, W)`` bool; ``masks[:, 0]`` is the explained object.
        targets (Tensor): ``(N,)`` explained class (the more probable of the two objects).
        others (Tensor): ``(N,)`` the other object's class.
        probs (Tensor): ``(N, classes)`` softmax outputs.
        maps (dict[str, dict[str, Tensor]]): method -> layer -> ``(N, 1, h, w)`` raw map.
        shares (dict[str, dict[str, tuple[float, float]]]): method -> layer -> mean share of the
                    positive map energy on (explained object, other object).
        class_names (list[str]): class names.
        model_note (str): which model and weights were used.
        trained (bool): whether trained weights were loaded.
        seconds (float): compute time.
    """

    images: Tensor
    masks: Tensor
    targets: Tensor
    others: Tensor
    probs: Tensor
    maps: Dict[str, Dict[str, Tensor]]
    shares: Dict[str, Dict[str, Tuple[float, float]]]
    class_names: List[str]
    model_note: str
    trained: bool
    seconds: float


def _load_model(name: str) -> Tuple[nn.Module, Dict[str, nn.Module], str, bool]:
    from .models import benchmark_layers, build_benchmark_model, load_benchmark_model

    try:
        model = load_benchmark_model(name)
        note, trained = f"benchmark model {name!r} ({type(model).__name__}, trained weights)", True
    except FileNotFoundError:
        torch.manual_seed(0)
        model = build_benchmark_model(name).eval()
        note = (
            f"benchmark model {name!r} ({type(model).__name__}) with RANDOM weights: trained weights not found "
            "(run `python benchmarks/train_models.py`); the maps below are not meaningful"
        )
        trained = False
    return model, benchmark_layers(model), note, trained


def energy_shares(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Share of each map's positive energy inside each mask.

    Args:
        maps (Tensor): ``(N, 1, h, w)`` maps at any resolution (upsampled bilinearly to the masks).
        masks (Tensor): ``(N, K, H, W)`` bool masks.

    Returns:
        Tensor: ``(N, K)``; ``sum(max(m, 0) * mask_k) / sum(max(m, 0))`` (0 for an all-zero map).
    """
    up = F.interpolate(maps.float(), size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False).clamp(min=0)
    total = up.flatten(1).sum(1, keepdim=True)
    inside = (up * masks.float()).flatten(2).sum(2)
    return torch.where(total > 0, inside / total.clamp(min=1e-30), torch.zeros_like(inside))


def compute_demo(
    num_images: int = 8,
    model_name: str = "vgg",
    methods: Sequence[str] = _DEMO_METHOD_NAMES,
    seed: int = 2,
) -> DemoResult:
    r"""Compute the demo's maps and energy shares (no files, no printing).

    Args:
        num_images (int, optional): two-object images to average the shares over. Default: 8
        model_name (str, optional): benchmark model, ``"vgg"`` or ``"resnet"``. Default: ``"vgg"``
        methods (sequence of str, optional): names in :data:`captum_normgrad.registry.METHODS`.
                    Default: the four rows of Figure 1
        seed (int, optional): seed of the generated images (2 is the test split). Default: 2

    Returns:
        DemoResult
    """
    from .explain import compute_maps

    t0 = time.perf_counter()
    model, layers, note, trained = _load_model(model_name)
    from .datasets import CLASS_NAMES, TwoObjectShapesDataset

    images, labels, masks = TwoObjectShapesDataset(num_images, seed=seed).tensors()
    class_names = list(CLASS_NAMES)
    with torch.no_grad():
        probs = model(images).softmax(1)
    # explain the more probable of the two objects (the paper's "tiger cat"), contrast with the other
    p_two = probs.gather(1, labels)
    first = p_two.argmax(1)
    order = torch.stack([first, 1 - first], 1)
    labels = labels.gather(1, order)
    masks = masks[torch.arange(num_images)[:, None], order]
    targets, others = labels[:, 0], labels[:, 1]
    maps: Dict[str, Dict[str, Tensor]] = {}
    shares: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for method in methods:
        per_layer = compute_maps(method, model, list(layers.values()), images, targets)
        maps[method] = dict(zip(layers, per_layer))
        shares[method] = {}
        for lname, m in maps[method].items():
            s = energy_shares(m, masks).mean(0)
            shares[method][lname] = (float(s[0]), float(s[1]))
    return DemoResult(
        images,
        masks,
        targets,
        others,
        probs,
        maps,
        shares,
        class_names,
        note,
        trained,
        time.perf_counter() - t0,
    )


def plot_figure1(result: DemoResult, path: Path, index: int = 0) -> Path:
    """Draw the Figure-1 grid (methods x layers over image ``index``) of a :class:`DemoResult` as a PNG.

    The grid is :func:`captum_normgrad.viz.plot_attribution_grid`; on top of it the object outlines
    (explained object green, other object red) and, in each cell, the share of the map's positive
    energy on the explained object / on the other object.
    """
    from .viz import plot_attribution_grid

    labels = dict(DEMO_METHODS)
    methods = list(result.maps)
    layer_names = list(next(iter(result.maps.values())))
    columns = {ln: f"{ln} ({m.shape[-2]}x{m.shape[-1]})" for ln, m in next(iter(result.maps.values())).items()}
    grid = {labels.get(m, m): {columns[ln]: result.maps[m][ln] for ln in layer_names} for m in methods}
    tname = result.class_names[int(result.targets[index])]
    oname = result.class_names[int(result.others[index])]
    title = (
        f"explaining {tname!r} (green outline); other object {oname!r} (red)\n"
        f"numbers: share of positive map energy on {tname} / on {oname}"
        + ("" if result.trained else "\nRANDOM WEIGHTS (no trained benchmark weights found): not meaningful")
    )
    with warnings.catch_warnings():  # Captum warns on near-constant maps (e.g. Grad-CAM at early layers)
        warnings.filterwarnings("ignore", message="Attempting to normalize by value approximately 0")
        fig = plot_attribution_grid(result.images, grid, None, sample=index, cell_size=1.9, title=title)
    fig.suptitle(title, fontsize=8, color="black" if result.trained else "red")
    ncols = len(layer_names) + 1
    image_ax = fig.axes[0]
    image_ax.contour(result.masks[index, 0].numpy(), levels=[0.5], colors="lime", linewidths=0.8)
    image_ax.contour(result.masks[index, 1].numpy(), levels=[0.5], colors="red", linewidths=0.8)
    height = result.images.shape[-2]
    for r, method in enumerate(methods):
        fig.axes[r * ncols].yaxis.label.set_fontsize(8)
        for c, ln in enumerate(layer_names):
            share = energy_shares(result.maps[method][ln][index : index + 1], result.masks[index : index + 1])[0]
            fig.axes[r * ncols + c + 1].text(
                1,
                height - 2,
                f"{float(share[0]):.2f} / {float(share[1]):.2f}",
                fontsize=6,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0},
            )
    # Captum's absolute-value heat maps: Blues, each map divided by its 98th percentile, clipped to [0, 1]
    from matplotlib import cm, colors

    fig.set_layout_engine(None)
    fig.subplots_adjust(right=0.92)
    cax = fig.add_axes((0.935, 0.15, 0.012, 0.6))
    bar = fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="Blues"), cax=cax)
    bar.set_label("map / its 98th percentile (clipped)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=110)
    return path


#: The verdicts of the full benchmark (``benchmarks/bench_claims.py``, ``docs/benchmarks.md``).
BENCHMARK_VERDICTS = (
    "On the full benchmark (benchmarks/bench_claims.py, hundreds of images, both models): claim 1 holds on VGG",
    "(partly on ResNet), claim 2 holds, claim 3 does NOT hold (best energy ratio 1.68 VGG / 1.26 ResNet over",
    "eps in 5e-4..5e-2, criterion 2x), claim 4 holds only partly, claim 5 holds (rho 0.98-1.00).",
)


def _ratio(t: float, o: float) -> float:
    return t / o if o > 0 else float("inf")


def claim_verdicts(result: DemoResult) -> List[str]:
    """One line per Figure-1 claim that this demo's numbers speak to, with the numbers and the
    verdict (same criterion as the benchmark: a class-selective map puts at least 2x the energy on
    the explained object), then the full benchmark's verdicts."""
    lines = ["The paper's Figure-1 claims, on these images (selective = energy on explained >= 2x other):"]

    def ratios(method: str) -> List[float]:
        return [_ratio(t, o) for t, o in result.shares.get(method, {}).values()]

    order0, order1, adv = (ratios(m) for m, _ in DEMO_METHODS[1:4])
    fmt = lambda rs: "/".join(f"{r:.2f}" for r in rs)  # noqa: E731
    if order0:
        holds = all(r < 2 for r in order0)
        lines.append(
            f"  claim 2, order 0 highlights both objects: {'holds' if holds else 'does not hold'} "
            f"(ratio explained/other per layer {fmt(order0)})"
        )
    if order1:
        holds = all(r >= 2 for r in order1)
        some = any(r >= 2 for r in order1)
        verdict = "holds" if holds else ("holds at some layers only" if some else "does NOT hold")
        lines.append(f"  claim 3, order 1 highlights the explained object: {verdict} (ratio {fmt(order1)})")
        if order0 and any(r1 < r0 for r1, r0 in zip(order1, order0)):
            lines.append(
                "    where order 1's ratio is below order 0's (typically early blocks), that is the formula at"
            )
            lines.append("    work: the inner step lowers the loss through the explained object's features, so the")
            lines.append(
                "    remaining gradient at theta' shrinks there and the map's energy shifts to the other object."
            )
    if adv:
        holds = all(r < 1 for r in adv)
        some = any(r < 1 for r in adv)
        verdict = "holds" if holds else ("holds at some layers only" if some else "does NOT hold")
        lines.append(f"  claim 4, the adversarial map highlights the other object: {verdict} (ratio {fmt(adv)})")
    lines.append(f"  (claim 1 on {DEMO_METHODS[0][1]}, and claim 5, need the pointing game on many images.)")
    return lines + list(BENCHMARK_VERDICTS)


def _summary_text(result: DemoResult, figure: Path) -> str:
    labels = dict(DEMO_METHODS)
    layer_names = list(next(iter(result.maps.values())))
    n = result.images.shape[0]
    lines = [
        f"captum-normgrad demo: {result.model_note}",
        f"{n} generated two-object images; each map explains the more probable of its two objects.",
        "Mean share of the positive map energy on the explained object / on the other object:",
        "",
        f"{'method':<22}" + "".join(f"{ln:>14}" for ln in layer_names),
    ]
    for method, per_layer in result.shares.items():
        lines.append(
            f"{labels.get(method, method):<22}" + "".join(f"{t:>8.2f}/{o:<5.2f}" for t, o in per_layer.values())
        )
    lines += ["", *claim_verdicts(result), "", f"Figure (image 0): {figure}    computed in {result.seconds:.1f} s"]
    return "\n".join(lines)


def run_demo(out: Path, progress: bool = True, num_images: int = 8, model_name: str = "vgg") -> str:
    r"""Run the demo and write its files into ``out``; returns the text summary.

    Args:
        out (Path): output folder (created).
        progress (bool, optional): show a progress bar on stderr. Default: True
        num_images (int, optional): images averaged in the summary. Default: 8
        model_name (str, optional): ``"vgg"`` or ``"resnet"``. Default: ``"vgg"``

    Returns:
        str: the summary (also written to ``out/summary.txt``).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc="demo", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("maps")
        result = compute_demo(num_images=num_images, model_name=model_name)
        bar.update(1)
        bar.set_postfix_str("figure")
        figure = plot_figure1(result, out / "figure1.png")
        bar.update(1)
        torch.save(
            {
                "maps": result.maps,
                "images": result.images,
                "masks": result.masks,
                "targets": result.targets,
                "others": result.others,
                "class_names": result.class_names,
            },
            out / "maps.pt",
        )
        summary = _summary_text(result, figure)
        (out / "summary.txt").write_text(summary + "\n")
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "model": result.model_note,
                    "trained": result.trained,
                    "num_images": int(result.images.shape[0]),
                    "targets": [result.class_names[int(t)] for t in result.targets],
                    "others": [result.class_names[int(t)] for t in result.others],
                    "energy_share_target_other": {
                        m: {k: list(v) for k, v in d.items()} for m, d in result.shares.items()
                    },
                    "figure": str(figure),
                    "seconds": round(result.seconds, 3),
                },
                indent=1,
            )
        )
        bar.update(1)
    return summary
