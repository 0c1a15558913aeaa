"""The NormGrad paper's claims (METHODS.md section 6) as numbers, on the generated ground-truth benchmark.

For Grad-CAM, gradient x activation, NormGrad order 0 (target logit, and CE loss), NormGrad
selective, order 1 (training), order 1 adversarial and the lookahead variant, at every block of the
two benchmark models (``captum_normgrad.models``, committed weights), on the generated shapes
(``captum_normgrad.datasets``, ``split="test"``):

pointing
    Pointing game on single-object images, TorchRay protocol: the map is upsampled (bilinear) to
    the 64 x 64 image, its argmax is the point, a hit when a mask pixel of the explained object
    lies *strictly* closer than ``--tolerance`` pixels; the score is the mean over classes of
    the per-class hit rate (``captum_normgrad.evaluation.pointing_game``). TorchRay's 15 px are
    measured on the original PASCAL VOC / COCO images (about 450 px on a side), i.e. about 3.3%
    of the image side; 3.3% of 64 px is 2.1 px, so the tolerance here is **2 px**. Explained
    class: the ground truth. A *centre* baseline (always point at the image centre) is
    reported, as in TorchRay.
selectivity
    On two-object images (two different classes, disjoint masks) that the model *recognises*
    (its two highest logits are exactly the two objects' classes; the subset is fixed by the
    model, before any map is computed), each object is explained in turn. Energy: share of the
    positive part of the upsampled map inside the explained object's mask and inside the other
    object's mask (``energy_pointing_game(..., negative="clip")``). Peak: share of maps whose
    argmax pixel lies inside the explained / the other object's mask (tolerance 0: the objects
    can be 3 px apart).
sensitivity
    Class sensitivity (``captum_normgrad.evaluation.class_sensitivity``): Spearman rho between the
    maps of the most and the least probable class, at the layer's resolution, signed maps as they
    are; lower is more class-sensitive.
randomization
    Model parameter randomization at full cascade
    (``captum_normgrad.evaluation.model_parameter_randomization`` with every parameterised module
    re-initialised): Spearman rho of the absolute maps (99th-percentile clipped) and SSIM between
    the trained model's map and the fully randomised model's map, each explaining its own argmax
    class; lower means the map depends on what the model learned (passes the sanity check).

Order 1 depends on its step size: the pointing and selectivity tables sweep
``epsilon in {5e-4, 5e-3, 5e-2}`` (the lookahead step likewise); class sensitivity and
randomization use the paper's ``5e-4``.

The verdicts on the claims use criteria fixed in ``CRITERIA`` below, written before the first
run; they are not tuned.

Full run (manual; 11 min on 2 shared CPU cores)::

    python benchmarks/bench_claims.py

CI smoke test (seconds; one layer, a few images)::

    python benchmarks/bench_claims.py --quick --out /tmp/claims
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from captum_normgrad._layers import get_layers
from captum_normgrad.registry import MethodEntry, get_method
from captum_normgrad.datasets import CLASS_NAMES, ShapesDataset, TwoObjectShapesDataset
from captum_normgrad._maps import reduce_map_channels
from captum_normgrad.evaluation import energy_pointing_game, pointing_game, pointing_points
from captum_normgrad.models import BENCHMARK_MODELS, benchmark_layers, load_benchmark_model
from captum_normgrad.evaluation import class_sensitivity, model_parameter_randomization, spearman_rho

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = (5e-4, 5e-3, 5e-2)
PAPER_EPSILON = 5e-4
TABLES = ("pointing", "selectivity", "sensitivity", "randomization")

# Criteria of the verdicts, fixed before the first run (percentage points / ratios).
CRITERIA = {
    "claim1": "NormGrad beats the centre baseline by >= 10 points at every block, Grad-CAM is >= 10 points "
    "below NormGrad at block1 and block2, and Grad-CAM beats the centre baseline by >= 10 points at block4",
    "selective": "energy on the explained object >= 2x energy on the other object AND peak on the explained "
    "object >= 2x as often as on the other object",
    "claim2": "NormGrad (order 0) is NOT selective: energy on the other object >= 0.5x energy on the explained one",
    "claim3": "order 1 (eps = 5e-4) is selective (criterion 'selective') at the block",
    "claim4": "order 1 adversarial (eps = 5e-4) puts more energy AND more peaks on the other object than on the explained one",
    "claim5": "mean Spearman rho between order 1 (eps = 5e-4) and order 0 with the same CE loss (its eps -> 0 limit) "
    ">= 0.8 on single-object images at the block",
}


# --------------------------------------------------------------------------- methods


_CE = nn.CrossEntropyLoss(reduction="none")


@dataclass(frozen=True)
class Method:
    """A configuration of the benchmark: a method of :mod:`captum_normgrad.registry` (which alone
    says what the name computes) plus benchmark-specific ``attribute`` options.

    ``key`` is the configuration's name in the results files (kept stable across releases);
    ``method`` is the registry name. ``build(model, layer)`` constructs the registry entry's class.
    """

    key: str
    label: str
    method: str
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def entry(self) -> MethodEntry:
        return get_method(self.method)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return {**self.entry.defaults, **self.extra}

    @property
    def multi_layer(self) -> bool:  # accepts a list of layers (one pass for all blocks)
        return self.entry.multi_layer

    @property
    def uses_epsilon(self) -> bool:
        return self.entry.order == 1

    def build(self, model: nn.Module, layer: Any) -> Any:
        return self.entry.attribution_class()(model, layer)


METHODS: Dict[str, Method] = {
    m.key: m
    for m in [
        Method("gradcam", "Grad-CAM", "gradcam_relu"),
        Method("gxa", "Gradient x activation", "gradxact"),
        Method("normgrad", "NormGrad (order 0)", "normgrad"),
        Method("normgrad_ce", "NormGrad (order 0, CE loss)", "normgrad", {"loss_fn": _CE}),
        Method("selective", "NormGrad selective", "normgrad_selective"),
        Method("order1", "Order 1 (training)", "normgrad_order1", {"compute_dtype": "auto"}),
        Method("order1_adv", "Order 1 adversarial", "normgrad_order1_adversarial", {"compute_dtype": "auto"}),
        Method("lookahead", "Lookahead (hessian='none')", "normgrad_lookahead", {"compute_dtype": "auto"}),
    ]
}


SHORT_LABELS = {
    "gradcam": "Grad-CAM", "gxa": "Grad x act.", "normgrad": "NormGrad", "normgrad_ce": "NormGrad (CE)",
    "selective": "Selective", "order1": "Order 1", "order1_adv": "Order 1 adv.", "lookahead": "Lookahead",
}


def configs(method_keys: Sequence[str], epsilons: Sequence[float]) -> List[Tuple[str, Optional[float]]]:
    """(method key, epsilon) pairs: order-1 methods once per epsilon, the others once."""
    out: List[Tuple[str, Optional[float]]] = []
    for k in method_keys:
        out += [(k, e) for e in epsilons] if METHODS[k].uses_epsilon else [(k, None)]
    return out


def config_name(key: str, eps: Optional[float]) -> str:
    return key if eps is None else f"{key}@{eps:g}"


def attribute_kwargs(key: str, eps: Optional[float]) -> Dict[str, Any]:
    kw = dict(METHODS[key].kwargs)
    if eps is not None:
        kw["epsilon"] = eps
    return kw


def compute_maps(
    model: nn.Module, key: str, eps: Optional[float], layer_names: Sequence[str], x: Tensor, target: Tensor, batch: int
) -> Dict[str, Tensor]:
    """``{layer name: (N, 1, h, w) map}`` (channels summed) for every layer, in batches."""
    method = METHODS[key]
    kw = attribute_kwargs(key, eps)
    out: Dict[str, List[Tensor]] = {n: [] for n in layer_names}
    bound = method.entry.build(model, get_layers(model, layer_names))
    for start in range(0, x.shape[0], batch):
        xs, ts = x[start : start + batch], target[start : start + batch]
        res = bound.attribute(xs, target=ts, **kw)
        for n, m in zip(layer_names, res):
            out[n].append(reduce_map_channels(m.detach().float(), "sum"))
    return {n: torch.cat(v) for n, v in out.items()}


# --------------------------------------------------------------------------- measures


def centre_baseline(masks: Tensor, labels: Tensor, tolerance: float) -> float:
    """Pointing accuracy of always pointing at the image centre (TorchRay's baseline)."""
    n, h, w = masks.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    centre = -((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2)
    return pointing_game(centre.expand(n, 1, h, w).clone(), masks, labels, tolerance=tolerance).accuracy


def selectivity_measures(maps: Tensor, target_masks: Tensor, other_masks: Tensor) -> Dict[str, float]:
    """Positive-energy shares and peak rates on the explained and on the other object."""
    e_t = energy_pointing_game(maps, target_masks, negative="clip")
    e_o = energy_pointing_game(maps, other_masks, negative="clip")
    pts = pointing_points(maps, target_masks.shape[-2:])
    idx = torch.arange(maps.shape[0])
    on_t = target_masks[idx, pts[:, 0], pts[:, 1]]
    on_o = other_masks[idx, pts[:, 0], pts[:, 1]]
    return {
        "energy_target": float(e_t.mean()),
        "energy_other": float(e_o.mean()),
        "peak_target": float(on_t.float().mean()),
        "peak_other": float(on_o.float().mean()),
    }


def is_selective(s: Dict[str, float]) -> bool:
    return s["energy_target"] >= 2 * s["energy_other"] and s["peak_target"] >= 2 * s["peak_other"]


def mean_rho(a: Tensor, b: Tensor) -> float:
    rhos = [spearman_rho(u, v) for u, v in zip(a, b)]
    finite = [r for r in rhos if math.isfinite(r)]
    return float(np.mean(finite)) if finite else float("nan")


# --------------------------------------------------------------------------- the benchmark


def recognised_pairs(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    return (top2.sort(1).values == labels.sort(1).values).all(1)


def run_model(name: str, args: argparse.Namespace, progress: bool) -> Dict[str, Any]:
    model = load_benchmark_model(name)
    blocks = benchmark_layers(model)
    block_keys = list(blocks)[-1:] if args.quick else list(blocks)
    layer_names = [model.block_names[list(blocks).index(b)] for b in block_keys]
    res: Dict[str, Any] = {"model": name, "blocks": dict(zip(block_keys, layer_names))}
    all_configs = configs(args.methods, args.epsilons)
    default_configs = configs(args.methods, [PAPER_EPSILON] if PAPER_EPSILON in args.epsilons else args.epsilons[:1])

    # ---- single-object images: pointing (+ order-0 vs order-1 similarity for claim 5)
    x, y, masks = ShapesDataset(args.n_pointing, split="test").tensors()
    if "pointing" in args.tables:
        res["pointing"] = {"centre_baseline": centre_baseline(masks, y, args.tolerance), "n_images": len(y)}
        point_maps: Dict[str, Dict[str, Tensor]] = {}
        for key, eps in tqdm(all_configs, desc=f"{name}: pointing", disable=not progress):
            maps = compute_maps(model, key, eps, layer_names, x, y, args.batch)
            point_maps[config_name(key, eps)] = maps
            res["pointing"][config_name(key, eps)] = {
                b: pointing_game(maps[ln], masks, y, tolerance=args.tolerance).accuracy for b, ln in zip(block_keys, layer_names)
            }
        sim: Dict[str, Dict[str, float]] = {}
        for key in ("order1", "lookahead"):
            for eps in args.epsilons:
                c = config_name(key, eps)
                if c not in point_maps:
                    continue
                for ref in ("normgrad_ce", "normgrad"):
                    if ref in point_maps:
                        sim[f"{c} vs {ref}"] = {
                            b: mean_rho(point_maps[c][ln], point_maps[ref][ln]) for b, ln in zip(block_keys, layer_names)
                        }
        res["order0_vs_order1_rho"] = sim

    # ---- two-object images: class selectivity
    if "selectivity" in args.tables:
        px, py, pm = TwoObjectShapesDataset(args.n_pairs, split="test").tensors()
        keep = recognised_pairs(model, px, py)
        px, py, pm = px[keep], py[keep], pm[keep]
        # explain each object in turn: rows [img0 -> obj0, img0 -> obj1, img1 -> obj0, ...]
        xs = px.repeat_interleave(2, 0)
        targets = py.reshape(-1)
        tmask = pm.reshape(-1, *pm.shape[-2:])
        omask = pm.flip(1).reshape(-1, *pm.shape[-2:])
        res["selectivity"] = {
            "n_images": int(keep.sum()),
            "n_generated": args.n_pairs,
            "uniform_map": {
                "energy_target": float(tmask.float().mean((1, 2)).mean()),
                "energy_other": float(omask.float().mean((1, 2)).mean()),
            }
            if len(targets)
            else None,
        }
        if len(targets):
            for key, eps in tqdm(all_configs, desc=f"{name}: selectivity", disable=not progress):
                maps = compute_maps(model, key, eps, layer_names, xs, targets, args.batch)
                res["selectivity"][config_name(key, eps)] = {
                    b: selectivity_measures(maps[ln], tmask, omask) for b, ln in zip(block_keys, layer_names)
                }

    # ---- class sensitivity and randomization (paper epsilon only), via the sanity toolkit
    if "sensitivity" in args.tables:
        sx = x[: args.n_sensitivity]
        res["sensitivity"] = {"n_images": len(sx)}
        for key, eps in tqdm(default_configs, desc=f"{name}: class sensitivity", disable=not progress):
            res["sensitivity"][config_name(key, eps)] = {
                b: class_sensitivity(
                    model, METHODS[key].build, ln, sx, attribute_kwargs=attribute_kwargs(key, eps), keep_maps=False
                ).mean()
                for b, ln in zip(block_keys, layer_names)
            }
    if "randomization" in args.tables:
        rx = x[: args.n_randomization]
        res["randomization"] = {"n_images": len(rx), "modules": "every parameterised module (full cascade)"}
        for key, eps in tqdm(default_configs, desc=f"{name}: randomization", disable=not progress):
            row = {}
            for b, ln in zip(block_keys, layer_names):
                r = model_parameter_randomization(
                    model, METHODS[key].build, ln, rx, modules=[""], attribute_kwargs=attribute_kwargs(key, eps),
                    keep_maps=False, seed=args.seed,
                ).mean()
                row[b] = {"spearman_abs": float(r["spearman_abs"][0]), "ssim": float(r["ssim"][0])}
            res["randomization"][config_name(key, eps)] = row
    return res


# --------------------------------------------------------------------------- verdicts


def _blocks(r: Dict[str, Any]) -> List[str]:
    return list(r["blocks"])


def verdicts(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (claim, model): the criterion, the blocks where it holds, the numbers."""
    out = []
    eps = f"{PAPER_EPSILON:g}"

    def summary(held: List[bool]) -> str:
        return "holds" if all(held) else ("partly" if any(held) else "does not hold")

    for name, r in results.items():
        blocks = _blocks(r)
        p = r.get("pointing", {})
        if "normgrad" in p and "gradcam" in p:
            base = p["centre_baseline"]
            ng, gc = p["normgrad"], p["gradcam"]
            early = [b for b in ("block1", "block2") if b in blocks]
            checks = [ng[b] >= base + 0.10 for b in blocks] + [gc[b] <= ng[b] - 0.10 for b in early]
            if "block4" in blocks:
                checks.append(gc["block4"] >= base + 0.10)
            out.append({
                "claim": 1, "model": name, "verdict": summary(checks),
                "numbers": f"centre {100 * base:.0f}%; NormGrad " + "/".join(f"{100 * ng[b]:.0f}" for b in blocks)
                + "; Grad-CAM " + "/".join(f"{100 * gc[b]:.0f}" for b in blocks),
            })
        s = r.get("selectivity", {})
        if "normgrad" in s:
            held = [s["normgrad"][b]["energy_other"] >= 0.5 * s["normgrad"][b]["energy_target"] for b in blocks]
            out.append({"claim": 2, "model": name, "verdict": summary(held), "blocks_held": sum(held),
                        "numbers": _sel_numbers(s["normgrad"], blocks)})
        if f"order1@{eps}" in s:
            held = [is_selective(s[f"order1@{eps}"][b]) for b in blocks]
            sweep = ", ".join(
                f"ε={c.partition('@')[2]}: {sum(is_selective(s[c][b]) for b in blocks)}/{len(blocks)}"
                for c in s if c.startswith("order1@")
            )
            ratio, where = max(
                (s[c][b]["energy_target"] / max(s[c][b]["energy_other"], 1e-12), f"{b}, ε={c.partition('@')[2]}")
                for c in s if c.startswith("order1@") for b in blocks
            )
            out.append({"claim": 3, "model": name, "verdict": summary(held), "blocks_held": sum(held),
                        "numbers": _sel_numbers(s[f"order1@{eps}"], blocks) + f"; selective blocks over the sweep: {sweep}; "
                        f"best energy ratio explained/other over the sweep {ratio:.2f} ({where})"})
        if f"order1_adv@{eps}" in s:
            a = s[f"order1_adv@{eps}"]
            held = [a[b]["energy_other"] > a[b]["energy_target"] and a[b]["peak_other"] > a[b]["peak_target"] for b in blocks]
            out.append({"claim": 4, "model": name, "verdict": summary(held), "blocks_held": sum(held),
                        "numbers": _sel_numbers(a, blocks)})
        sim = r.get("order0_vs_order1_rho", {}).get(f"order1@{eps} vs normgrad_ce")
        if sim:
            held = [sim[b] >= 0.8 for b in blocks]
            out.append({"claim": 5, "model": name, "verdict": summary(held), "blocks_held": sum(held),
                        "numbers": "rho " + "/".join(f"{sim[b]:.2f}" for b in blocks)})
    return out


def _sel_numbers(sel: Dict[str, Dict[str, float]], blocks: List[str]) -> str:
    return "energy target/other " + ", ".join(
        f"{100 * sel[b]['energy_target']:.0f}/{100 * sel[b]['energy_other']:.0f}" for b in blocks
    ) + "; peak target/other " + ", ".join(f"{100 * sel[b]['peak_target']:.0f}/{100 * sel[b]['peak_other']:.0f}" for b in blocks)


# --------------------------------------------------------------------------- outputs


def _label(cfg: str) -> str:
    key, _, eps = cfg.partition("@")
    return METHODS[key].label + (f", ε={eps}" if eps else "")


def _pct(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _num(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.2f}"


def markdown(payload: Dict[str, Any], figures: Dict[str, List[str]]) -> str:
    results = payload["results"]
    s = payload["settings"]
    L: List[str] = ["## The NormGrad paper's claims on the ground-truth benchmark", ""]
    L += [
        "Models: the committed `ShapesVGG` and `ShapesResNet` (see the training table), explained at the end "
        "of each block. Images: `ShapesDataset(split=\"test\")` and `TwoObjectShapesDataset(split=\"test\")`, "
        "64 x 64. Protocols, criteria and tolerances are documented in `benchmarks/bench_claims.py`: "
        f"pointing tolerance {s['tolerance']:g} px (TorchRay's 15 px on ~450 px VOC images, scaled to 64 px), "
        "mean over classes of the per-class hit rate; selectivity on the two-object images the model "
        "recognises (top-2 logits = the two objects); class sensitivity and randomization use "
        f"ε = {PAPER_EPSILON:g} for the order-1 family.",
        "",
        "### Verdicts",
        "",
        "| claim | model | verdict | numbers (block1/…/block4) |",
        "|---|---|---|---|",
    ]
    claim_text = {
        1: "Grad-CAM useful only near the end; NormGrad at every depth",
        2: "order 0 is not class-selective (highlights both objects)",
        3: f"order 1 (ε={PAPER_EPSILON:g}) highlights the explained object at every depth",
        4: f"order 1 adversarial (ε={PAPER_EPSILON:g}) highlights the other object",
        5: f"single object: order 0 and order 1 (ε={PAPER_EPSILON:g}) similar",
    }
    for v in payload["verdicts"]:
        L.append(f"| {v['claim']}. {claim_text[v['claim']]} | {v['model']} | **{v['verdict']}** | {v['numbers']} |")
    L += ["", "Criteria (fixed before the first run):", ""]
    L += [f"- {k}: {t}" for k, t in CRITERIA.items()]
    L.append("")
    for name, r in results.items():
        blocks = _blocks(r)
        head = " | ".join(f"{b} (`{r['blocks'][b]}`)" for b in blocks)
        sep = "|---|" + "---:|" * len(blocks)
        if "pointing" in r:
            p = r["pointing"]
            L += [f"### {name}: pointing game (%), {p['n_images']} single-object images", "", f"| method | {head} |", sep]
            L.append("| centre baseline | " + " | ".join(_pct(p["centre_baseline"]) for _ in blocks) + " |")
            for cfg, row in p.items():
                if isinstance(row, dict):
                    L.append(f"| {_label(cfg)} | " + " | ".join(_pct(row[b]) for b in blocks) + " |")
            L.append("")
            if r.get("order0_vs_order1_rho"):
                L += [f"Spearman rho between order-1 and order-0 maps on the same single-object images ({name}):", "",
                      f"| pair | {head} |", sep]
                for pair, row in r["order0_vs_order1_rho"].items():
                    a, _, b = pair.partition(" vs ")
                    L.append(f"| {_label(a)} vs {_label(b)} | " + " | ".join(_num(row[x]) for x in blocks) + " |")
                L.append("")
        if "selectivity" in r:
            sel = r["selectivity"]
            u = sel["uniform_map"]
            L += [
                f"### {name}: class selectivity on two-object images ({sel['n_images']} of {sel['n_generated']} recognised)",
                "",
            ]
            if u is None:
                L += ["No two-object image was recognised by the model: nothing to measure.", ""]
            else:
                L += [
                    "Cells: positive energy on the explained / other object (%) · map peak on the explained / other "
                    f"object (%). A uniform map puts {100 * u['energy_target']:.0f}% / {100 * u['energy_other']:.0f}% "
                    "of its energy on them.",
                    "",
                    f"| method | {head} |",
                    sep,
                ]
                for cfg, row in sel.items():
                    if isinstance(row, dict) and "energy_target" not in row:
                        L.append(
                            f"| {_label(cfg)} | "
                            + " | ".join(
                                f"{_pct(row[b]['energy_target'])} / {_pct(row[b]['energy_other'])} · "
                                f"{_pct(row[b]['peak_target'])} / {_pct(row[b]['peak_other'])}"
                                for b in blocks
                            )
                            + " |"
                        )
                L.append("")
        if "sensitivity" in r:
            sn = r["sensitivity"]
            L += [f"### {name}: class sensitivity (Spearman rho, most vs least probable class; lower is more "
                  f"class-sensitive), {sn['n_images']} images", "", f"| method | {head} |", sep]
            for cfg, row in sn.items():
                if isinstance(row, dict):
                    L.append(f"| {_label(cfg)} | " + " | ".join(_num(row[b]) for b in blocks) + " |")
            L.append("")
        if "randomization" in r:
            rn = r["randomization"]
            L += [f"### {name}: parameter randomization, full cascade (Spearman rho of |maps| · SSIM; lower "
                  f"passes), {rn['n_images']} images", "", f"| method | {head} |", sep]
            for cfg, row in rn.items():
                if isinstance(row, dict):
                    L.append(f"| {_label(cfg)} | " + " | ".join(
                        f"{_num(row[b]['spearman_abs'])} · {_num(row[b]['ssim'])}" for b in blocks) + " |")
            L.append("")
    for title, files in figures.items():
        if files:
            L += [f"### {title}", "", " ".join(f"![{title}]({f})" for f in files), ""]
    L += [f"Machine: {payload['machine']}; {payload['elapsed_s']:.0f} s. Reproduce with:", "", "```bash",
          payload["command"], "```", ""]
    return "\n".join(L)


def first_recognised_pair(model: nn.Module, n_pairs: int) -> Optional[Tuple[Tensor, Tensor]]:
    """The first two-object test image the model recognises: ``(image (1, 3, H, W), labels (2,))``."""
    ds = TwoObjectShapesDataset(n_pairs, split="test")
    for i in range(len(ds)):
        image, labels, _ = ds[i]
        if bool(recognised_pairs(model, image[None], labels[None])[0]):
            return image[None], labels
    return None


def make_figures(results: Dict[str, Dict[str, Any]], out: Path, args: argparse.Namespace) -> Dict[str, List[str]]:
    """Figure-1 grids (methods x blocks for each object of one recognised pair), and plots."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from captum_normgrad.viz import compute_attribution_grid, plot_attribution_grid

    fig1 = "Figure 1 on the benchmark: one two-object image, the maps explaining each object"
    figs: Dict[str, List[str]] = {fig1: []}
    grid_methods = [k for k in ("gradcam", "normgrad", "selective", "order1", "order1_adv", "lookahead") if k in args.methods]
    eps = PAPER_EPSILON if PAPER_EPSILON in args.epsilons else args.epsilons[0]
    for name, r in results.items():
        model = load_benchmark_model(name)
        pair = first_recognised_pair(model, args.n_pairs)
        if pair is None or not grid_methods:
            continue
        image, labels = pair
        methods = {}
        for k in grid_methods:
            kw = attribute_kwargs(k, eps if METHODS[k].uses_epsilon else None)
            methods[SHORT_LABELS[k]] = (METHODS[k].build, kw)
        layer_names = list(r["blocks"].values())
        for j in range(2):
            target = int(labels[j])
            maps = compute_attribution_grid(model, image, methods, layer_names, target=target)
            fname = f"bench_claims_figure1_{name}_{j}.png"
            plot_attribution_grid(
                image, maps, out / fname, cell_size=1.4, cmap="jet", alpha_overlay=0.55,
                title=f"{name}: explaining {CLASS_NAMES[target]} (other: {CLASS_NAMES[int(labels[1 - j])]}), ε={eps:g}",
            )
            figs[fig1].append(fname)

    # pointing vs depth, and selectivity vs epsilon
    plots: List[str] = []
    if all("pointing" in r for r in results.values()):
        fig = Figure(figsize=(5 * len(results) + 2.5, 3.6))
        axes = fig.subplots(1, len(results), squeeze=False)[0]
        for ax, (name, r) in zip(axes, results.items()):
            blocks = _blocks(r)
            for cfg, row in r["pointing"].items():
                if isinstance(row, dict) and ("@" not in cfg or cfg.endswith(f"@{eps:g}")):
                    ax.plot(range(len(blocks)), [100 * row[b] for b in blocks], marker="o", label=_label(cfg))
            ax.axhline(100 * r["pointing"]["centre_baseline"], color="k", ls="--", lw=1, label="centre baseline")
            ax.set_xticks(range(len(blocks)), blocks)
            ax.set_ylim(0, 102)
            ax.set_title(f"{name}: pointing game")
            ax.set_ylabel("accuracy (%)")
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        fig.savefig(out / "bench_claims_pointing.png", dpi=90)
        plots.append("bench_claims_pointing.png")
    family = [k for k in ("order1", "order1_adv", "lookahead") if k in args.methods]
    if len(args.epsilons) > 1 and family and all("selectivity" in r and r["selectivity"]["uniform_map"] for r in results.values()):
        fig = Figure(figsize=(3.3 * len(family) + 1.5, 2.8 * len(results)))
        axes = fig.subplots(len(results), len(family), squeeze=False, sharey=True)
        for i, (name, r) in enumerate(results.items()):
            sel = r["selectivity"]
            for j, key in enumerate(family):
                ax = axes[i][j]
                for bi, b in enumerate(_blocks(r)):
                    vals = [sel.get(config_name(key, e), {}).get(b) for e in args.epsilons]
                    if all(v is not None for v in vals):
                        ratio = [v["energy_target"] / max(v["energy_other"], 1e-9) for v in vals]
                        line = ax.plot(args.epsilons, ratio, marker="o", color=f"C{bi}", label=b)[0]
                        if "normgrad_ce" in sel:
                            ref = sel["normgrad_ce"][b]
                            ax.axhline(ref["energy_target"] / max(ref["energy_other"], 1e-9), color=line.get_color(),
                                       ls=":", lw=1)
                ax.axhline(2.0, color="k", lw=0.8, ls="--")
                ax.axhline(1.0, color="k", lw=0.5)
                ax.set_xscale("log")
                ax.set_title(f"{name}: {SHORT_LABELS[key]}", fontsize=9)
                if i == len(results) - 1:
                    ax.set_xlabel("ε")
                if j == 0:
                    ax.set_ylabel("energy explained / other")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5),
                           title="block (dotted: order 0,\nCE loss; dashed: 2x)", title_fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "bench_claims_selectivity_eps.png", dpi=90)
        plots.append("bench_claims_selectivity_eps.png")
    figs["Plots"] = plots
    return figs


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(BENCHMARK_MODELS), choices=BENCHMARK_MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS), help="order-1 / lookahead step sizes")
    p.add_argument("--n-pointing", type=int, default=180, help="single-object images (pointing, claim 5)")
    p.add_argument("--n-pairs", type=int, default=240, help="two-object images generated (recognised ones are used)")
    p.add_argument("--n-sensitivity", type=int, default=30)
    p.add_argument("--n-randomization", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=2.0, help="pointing tolerance in pixels (default 2, see above)")
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initialisations")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quick", action="store_true", help="CI smoke test: last block, few images, paper epsilon")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", default=None, help="recompute only verdicts, tables and figures from a previous "
                   "bench_claims.json (no maps are recomputed except the figures')")
    args = p.parse_args(argv)
    if args.quick:
        args.n_pointing, args.n_pairs, args.n_sensitivity, args.n_randomization = 6, 6, 2, 2
        args.epsilons = [PAPER_EPSILON]
    for k in ("n_pointing", "n_pairs", "n_sensitivity", "n_randomization", "batch"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if any(not (e > 0 and math.isfinite(e)) for e in args.epsilons):
        p.error("--epsilons must be positive numbers")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.from_json:
        previous = json.loads(Path(args.from_json).read_text())
        results, settings = previous["results"], previous["settings"]
        command, machine, elapsed = previous["command"], previous["machine"], previous["elapsed_s"]
        for k in ("methods", "epsilons", "n_pairs", "tolerance"):
            setattr(args, k, settings[k])
    else:
        results = {name: run_model(name, args, not args.no_progress) for name in args.models}
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "no_figures", "from_json")}
        command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/bench_claims.py", *argv])
        machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        elapsed = None
    payload = {
        "settings": settings,
        "criteria": CRITERIA,
        "results": results,
        "verdicts": verdicts(results),
        "machine": machine,
        "command": command,
    }
    figures = {} if args.no_figures else make_figures(results, out, args)
    payload["elapsed_s"] = elapsed if elapsed is not None else time.perf_counter() - t0
    payload["figures"] = figures
    (out / "bench_claims.json").write_text(json.dumps(payload, indent=2, allow_nan=True))
    (out / "bench_claims.md").write_text(markdown(payload, figures))
    for v in payload["verdicts"]:
        print(f"claim {v['claim']} ({v['model']}): {v['verdict']} - {v['numbers']}")
    print(f"wrote {out / 'bench_claims.md'} in {payload['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
