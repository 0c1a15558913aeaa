r"""Each method against the peers and against its floor, and how the costs scale (issue #14).

peers
    resnet18 (random init, eval), ``layer4``, batch 8, 224 px, methods interleaved in one process,
    medians of per-round ratios to Captum's ``LayerGradCam``: ``LayerNormGrad``, torchcam's
    ``GradCAM`` and pytorch-grad-cam's ``GradCAM`` (each measured only where its package is
    installed: ``pip install torchcam grad-cam``; they are benchmark-only extras, not dependencies).
    Every method computes one map for the given target classes.
floors
    What each per-sample method cannot avoid, timed in the same rounds: order 1 (finite
    difference) against 2 x (forward + backward with parameter gradients) + 2 x (forward + backward
    to the layer) on the batch with shared weights; parameter-saliency profiles against one batched
    forward + backward with summed weight gradients.
scaling
    Time per image of order 0, order 1 (finite difference) and parameter-saliency profiles as the
    batch grows (1 ... 32 at 112 px) and as the image grows (64 ... 448 px at batch 8), written as a
    figure (``bench_peers_scaling.png``).

Full run (manual; OMP_WAIT_POLICY=PASSIVE on a shared machine)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_peers_scaling.py --threads 2

CI smoke test (seconds)::

    python benchmarks/bench_peers_scaling.py --quick --out /tmp/peers
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from captum_normgrad import LayerNormGrad, LayerNormGradOrder1, ParameterSaliency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEM = "bench_peers_scaling"


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def peer_methods(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Callable[[], Any]]:
    """The Grad-CAM of each installed library and ours, on ``layer4``."""
    from captum.attr import LayerGradCam

    targets = y.tolist()
    fns: Dict[str, Callable[[], Any]] = {
        "captum LayerGradCam": lambda: LayerGradCam(model, model.layer4).attribute(x, targets),
        "LayerNormGrad": lambda: LayerNormGrad(model, model.layer4).attribute(x, targets),
    }
    if importlib.util.find_spec("torchcam") is not None:
        from torchcam.methods import GradCAM as TorchcamGradCAM

        def torchcam_gradcam() -> Any:
            with TorchcamGradCAM(model, target_layer="layer4") as extractor:
                out = model(x)
                return extractor(targets, out)

        fns["torchcam GradCAM"] = torchcam_gradcam
    if importlib.util.find_spec("pytorch_grad_cam") is not None:
        from pytorch_grad_cam import GradCAM as PgcGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        def pgc_gradcam() -> Any:
            with PgcGradCAM(model=model, target_layers=[model.layer4]) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])

        fns["pytorch-grad-cam GradCAM"] = pgc_gradcam
    return fns


def floor_methods(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str) -> Dict[str, Callable[[], Any]]:
    """Order 0, order 1 and profiles with the passes they cannot avoid (shared weights, whole batch)."""
    mod = dict(model.named_modules())[layer]
    params = [p for p in model.parameters() if p.requires_grad]
    ps = ParameterSaliency(model, mode="naive")

    def param_pass() -> None:
        loss = _ce(model(x), y).sum()
        torch.autograd.grad(loss, params)

    def layer_pass() -> None:
        store: Dict[str, torch.Tensor] = {}
        h = mod.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            loss = _ce(model(x), y).sum()
        finally:
            h.remove()
        torch.autograd.grad(loss, store["a"])

    def order1_floor() -> None:
        param_pass()
        param_pass()
        layer_pass()
        layer_pass()

    return {
        "order 0 (loss)": lambda: LayerNormGrad(model, mod).attribute(x, y.tolist(), loss_fn=_ce),
        "order 1 finite diff.": lambda: LayerNormGradOrder1(model, mod).attribute(x, y.tolist()),
        "order 1 floor": order1_floor,
        "profiles": lambda: ps.profiles(x, y),
        "profiles floor": param_pass,
    }


def _ratios(times: Dict[str, List[float]], ref: str) -> Dict[str, float]:
    return {k: _timing.paired_ratio(v, times[ref]) for k, v in times.items()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    model = _timing.torchvision_model("resnet18")
    res: Dict[str, Any] = {}
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    t = _timing.interleaved_timings(peer_methods(model, x, y), args.repeats, args.warmup)
    res["peers"] = {
        "ratio_to_layergradcam": _ratios(t, "captum LayerGradCam"),
        "ms_per_image": {k: 1e3 * _timing.median(v) / args.batch for k, v in t.items()},
        "installed": {m: importlib.util.find_spec(m) is not None for m in ("torchcam", "pytorch_grad_cam")},
    }
    xf = torch.rand(args.batch, 3, args.floor_size, args.floor_size, generator=g)
    yf = torch.randint(0, 1000, (args.batch,), generator=g)
    t = _timing.interleaved_timings(floor_methods(model, xf, yf, args.layer), args.repeats, args.warmup)
    r = _ratios(t, "order 0 (loss)")
    res["floors"] = {
        "ratio_to_order0": r,
        "order1_over_floor": _timing.paired_ratio(t["order 1 finite diff."], t["order 1 floor"]),
        "profiles_over_floor": _timing.paired_ratio(t["profiles"], t["profiles floor"]),
        "ms_per_image": {k: 1e3 * _timing.median(v) / args.batch for k, v in t.items()},
    }
    scaling: Dict[str, Dict[str, Dict[str, float]]] = {"batch": {}, "size": {}}
    for axis, points in (("batch", args.batches), ("size", args.sizes)):
        for p in points:
            b, s = (p, args.scaling_size) if axis == "batch" else (args.scaling_batch, p)
            xs = torch.rand(b, 3, s, s, generator=g)
            ys = torch.randint(0, 1000, (b,), generator=g)
            fns = {k: v for k, v in floor_methods(model, xs, ys, args.layer).items() if "floor" not in k}
            if s > args.order1_max_size:
                fns.pop("order 1 finite diff.")
            tt = _timing.interleaved_timings(fns, max(1, args.repeats // 2), args.warmup)
            scaling[axis][str(p)] = {k: 1e3 * _timing.median(v) / b for k, v in tt.items()}
    res["scaling"] = scaling
    if not args.no_figure:
        res["figure"] = make_figure(scaling, Path(args.out or ROOT / "benchmarks" / "results"), args)
    return res


def make_figure(scaling: Dict[str, Dict[str, Dict[str, float]]], out: Path, args: argparse.Namespace) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, axis, xlabel in (
        (axes[0], "batch", f"batch size ({args.scaling_size} px)"),
        (axes[1], "size", f"image side, px (batch {args.scaling_batch})"),
    ):
        pts = scaling[axis]
        xs = [int(k) for k in pts]
        for method in ("order 0 (loss)", "order 1 finite diff.", "profiles"):
            vals = [(x, pts[str(x)].get(method)) for x in xs]
            vals = [(a, b) for a, b in vals if b is not None]
            if vals:
                ax.plot([a for a, _ in vals], [b for _, b in vals], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per image")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("resnet18 (random init), CPU: time per image as the batch and the image grow", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{STEM}.png"
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    import math

    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def _scaling_summary(scaling: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """What the scaling tables show, computed from them: per-image cost at the largest batch over
    the smallest, and the exponent of the cost in the number of pixels (1 = linear)."""
    parts = []
    methods = sorted({m for v in scaling["batch"].values() for m in v})
    for m in methods:
        pts = [(int(k), v[m]) for k, v in scaling["batch"].items() if m in v]
        sz = [(int(k) ** 2, v[m]) for k, v in scaling["size"].items() if m in v]
        text = f"{m}: per image, batch {pts[-1][0]} costs {pts[-1][1] / pts[0][1]:.2f}x batch {pts[0][0]}"
        if len(sz) >= 2:
            text += f"; cost ~ pixels^{_slope([a for a, _ in sz], [b for _, b in sz]):.2f}"
        parts.append(text)
    return "Measured: " + "; ".join(parts) + ". An exponent above 1 would be a super-linear region to explain."


def to_markdown(payload: Dict[str, Any]) -> str:
    res, env = payload["results"], payload["environment"]
    st = payload["settings"]
    p, f = res["peers"], res["floors"]
    lines = [
        "# Against the peers and against the floor",
        "",
        f"{env.get('cpu', 'cpu')}, torch {env.get('torch', '')}, {st['threads']} thread(s), resnet18 with random "
        f"weights (eval), medians of {st['repeats']} interleaved rounds. " + _timing.describe_load(env),
        "",
        f"**Peers** (`layer4`, batch {st['batch']}, {st['size']} px; ratio to Captum's LayerGradCam; a peer "
        "not installed is left out: "
        + ", ".join(f"{k} {'installed' if v else 'not installed'}" for k, v in p["installed"].items())
        + ")",
        "",
        _timing.markdown_table(
            ["method", "ms / image", "x LayerGradCam"],
            [[k, f"{p['ms_per_image'][k]:.1f}", f"{v:.2f}"] for k, v in p["ratio_to_layergradcam"].items()],
        ),
        "",
        f"**Floors** (`{st['layer']}`, batch {st['batch']}, {st['floor_size']} px; ratio to order 0 with the same "
        "loss). *order 1 floor*: 2 x (forward + backward with parameter gradients) + 2 x (forward + backward to "
        "the layer) with shared weights; *profiles floor*: one batched forward + backward with summed weight "
        "gradients.",
        "",
        _timing.markdown_table(
            ["method", "ms / image", "x order 0"],
            [[k, f"{f['ms_per_image'][k]:.1f}", f"{v:.2f}"] for k, v in f["ratio_to_order0"].items()],
        ),
        "",
        f"Order 1 costs **{f['order1_over_floor']:.2f}x its floor**; parameter-saliency profiles cost "
        f"**{f['profiles_over_floor']:.2f}x theirs**.",
        "",
        "**Scaling** (ms per image):",
        "",
    ]
    for axis, label in (("batch", "batch size"), ("size", "image side (px)")):
        pts = res["scaling"][axis]
        methods = sorted({m for v in pts.values() for m in v})
        rows = [[k] + [f"{pts[k][m]:.1f}" if m in pts[k] else "-" for m in methods] for k in pts]
        lines += [_timing.markdown_table([label] + methods, rows), ""]
    if res.get("figure"):
        lines += [f"![time per image against batch size and image size]({res['figure']})", ""]
    lines += [_scaling_summary(res["scaling"]), ""]
    lines += [
        f"Command: `{payload['command']}`",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="image side of the peers' comparison")
    p.add_argument("--floor-size", type=int, default=112, help="image side of the floors' comparison")
    p.add_argument("--layer", default="layer3")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 224, 448])
    p.add_argument("--scaling-size", type=int, default=112)
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--order1-max-size", type=int, default=224)
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch, args.size, args.floor_size = 1, 0, 2, 64, 32
        args.batches, args.sizes, args.scaling_size, args.scaling_batch = [1, 2], [32, 48], 32, 2
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _timing.torch_threads(args.threads):
        env = _timing.environment("cpu")
        results = run(args)
    env["loadavg_at_end"] = _timing.loadavg()
    return _timing.publish(STEM, __file__, argv, args, env, results, to_markdown, exclude=("out", "no_figure"))


if __name__ == "__main__":
    raise SystemExit(main())
