r"""Speed of NormGrad order 0 against Captum's LayerGradCam, and of the ``"weights"`` virtual layer
against an explicit ``unfold`` reference (issue #2).

Three measurements, all interleaved in one process (see ``_timing.py``), medians of repeated runs:

1. ``LayerNormGrad`` (default 1x1 virtual layer) vs ``LayerGradCam`` at the same layer, torchvision
   ``resnet18`` and ``vgg11`` (random init, eval mode), batch 8, 112-224 px. Target: <= 1.05x.
2. ``virtual_layer="weights"`` vs the 1x1 virtual layer at the same convolution (``resnet18``
   ``layer3[1].conv2``, the "layer3 sizes"). Target: <= 1.5x.
3. The ``"weights"`` map against :func:`unfold_weights_map`, a straightforward reference that builds
   every location's contribution ``g_u iota(x)_u^T`` from explicit ``F.unfold`` patches, takes its
   Frobenius norm and folds the values back onto the input grid with ``F.fold``. Timed both for the
   map stage alone (same captured tensors) and end to end (forward + backward + map). Target: >= 10x
   faster. A factorised unfold variant (``||g_u|| * ||iota(x)_u||`` from the unfolded patches, no outer
   product) is reported too, as the strongest unfold-based baseline.

Run from the repository root::

    python benchmarks/bench_order0.py            # full run, writes benchmarks/results/bench_order0.{json,md}
    python benchmarks/bench_order0.py --quick --out /tmp/bench   # CI smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

STEM = "bench_order0"

TARGET_ORDER0 = 1.05
TARGET_WEIGHTS = 1.5
TARGET_UNFOLD = 10.0


# --------------------------------------------------------------------------- the unfold reference


def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a Conv2d, derived from its public attributes."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads: List[int] = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # width first
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def unfold_weights_map(
    x_in: Tensor,
    g_out: Tensor,
    conv: nn.Conv2d,
    aggregation: str = "norm",
    grid: str = "input",
    method: str = "outer",
    max_elements: int = 2**22,
) -> Tensor:
    r"""Straightforward NormGrad map of a Conv2d's own weights, from explicit ``F.unfold`` patches.

    ``method="outer"`` builds every location's weight-gradient contribution
    ``T_u = g_u iota(x)_u^T`` (block-diagonal over groups: one ``C_out/G x C_in/G*k*k`` block per
    group) in chunks of locations and aggregates it literally (``norm``: Frobenius norm,
    ``filter_norm``: norm of the positive part, ``sum``, ``max``). ``method="factorised"`` (``norm``
    only) uses ``||T_u||^2 = sum_groups ||g_u,grp||^2 ||iota(x)_u,grp||^2`` on the unfolded patches.
    With ``grid="input"`` each location's value is added onto every input pixel of its patch
    (``F.fold`` on the padded grid, then the adjoint of the padding).

    Args:
        x_in: the convolution's input ``(N, C_in, H, W)``.
        g_out: gradient w.r.t. its output ``(N, C_out, H_out, W_out)``.
        conv: the ``nn.Conv2d`` (geometry only: kernel, stride, dilation, padding, padding_mode, groups).
        aggregation: ``"norm"``, ``"filter_norm"``, ``"sum"`` or ``"max"``.
        grid: ``"input"`` or ``"output"``.
        method: ``"outer"`` or ``"factorised"``.
        max_elements: bound on the elements of one chunk of outer products.

    Returns:
        ``(N, 1, H, W)`` for ``grid="input"``, ``(N, 1, H_out, W_out)`` otherwise.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError("the unfold reference handles nn.Conv2d only")
    if method == "factorised" and aggregation != "norm":
        raise ValueError("method='factorised' computes aggregation='norm' only")
    n, c_in, h, w = x_in.shape
    c_out, h_out, w_out = g_out.shape[1:]
    groups = conv.groups
    pad = _explicit_padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x_in, list(pad), mode=mode) if any(pad) else x_in
    k, d, s = tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.stride)
    patches = F.unfold(xp, k, dilation=d, stride=s)  # (N, C_in*kh*kw, L), channel-major
    n_loc = patches.shape[-1]
    if n_loc != h_out * w_out:
        raise ValueError(f"unfold found {n_loc} locations, the gradient has {h_out}x{w_out}")
    pg = patches.reshape(n, groups, (c_in // groups) * k[0] * k[1], n_loc)
    gg = g_out.reshape(n, groups, c_out // groups, n_loc)
    if method == "factorised":
        vals = (gg.square().sum(2) * pg.square().sum(2)).sum(1).sqrt()  # (N, L)
    elif method == "outer":
        gl = gg.permute(0, 3, 1, 2)  # (N, L, G, a)
        pl = pg.permute(0, 3, 1, 2)  # (N, L, G, b)
        per_loc = n * groups * gg.shape[2] * pg.shape[2]
        step = max(1, min(n_loc, max_elements // max(per_loc, 1)))
        chunks = []
        for l0 in range(0, n_loc, step):
            # T[n, l, grp] = g_u,grp iota(x)_u,grp^T, explicitly
            t = gl[:, l0 : l0 + step].unsqueeze(-1) * pl[:, l0 : l0 + step].unsqueeze(-2)
            dims = (2, 3, 4)
            if aggregation == "norm":
                chunks.append(torch.linalg.vector_norm(t, dim=dims))
            elif aggregation == "filter_norm":
                chunks.append(torch.linalg.vector_norm(t.clamp(min=0), dim=dims))
            elif aggregation == "sum":
                chunks.append(t.sum(dims))
            elif aggregation == "max":
                chunks.append(t.amax(dims))
            else:
                raise ValueError(f"unknown aggregation {aggregation!r}")
        vals = torch.cat(chunks, 1)
    else:
        raise ValueError(f"unknown method {method!r}")
    if grid == "output":
        return vals.reshape(n, 1, h_out, w_out)
    if grid != "input":
        raise ValueError(f"unknown grid {grid!r}")
    cols = vals.unsqueeze(1).expand(n, k[0] * k[1], n_loc)
    hp, wp = xp.shape[-2:]
    acc = F.fold(cols, (hp, wp), k, dilation=d, stride=s)  # (N, 1, Hp, Wp)
    if not any(pad):
        return acc
    if mode == "constant":
        return acc[:, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
    # adjoint of the non-zero padding (values on padded pixels go back to their source pixels)
    z = torch.zeros(n, 1, h, w, dtype=acc.dtype, device=acc.device, requires_grad=True)
    with torch.enable_grad():
        (back,) = torch.autograd.grad(F.pad(z, list(pad), mode=mode), z, grad_outputs=acc)
    return back


def capture_conv_io(model: nn.Module, conv: nn.Module, inputs: Tensor, target: Any) -> Tuple[Tensor, Tensor]:
    """Input activations of ``conv`` and the gradient of the target logits w.r.t. its output.

    Plain forward hook + ``torch.autograd.grad``; independent of ``captum_normgrad``'s plumbing. The
    hook is always removed and no ``.grad`` field is written.
    """
    saved: Dict[str, Tensor] = {}

    def hook(mod: nn.Module, inp: Tuple[Tensor, ...], out: Tensor) -> Tensor:
        saved["x"] = inp[0].detach()
        saved["y"] = out
        return out.clone()  # downstream in-place ops cannot touch the saved output

    handle = conv.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(inputs)
            idx = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
            objective = logits.gather(1, idx.reshape(-1, 1)).sum()
            (g,) = torch.autograd.grad(objective, saved["y"])
    finally:
        handle.remove()
    return saved["x"], g


def unfold_reference_attribute(
    model: nn.Module, conv: nn.Conv2d, inputs: Tensor, target: Any, aggregation: str = "norm",
    grid: str = "input", method: str = "outer",
) -> Tensor:
    """End-to-end unfold reference: forward + backward (``capture_conv_io``) + :func:`unfold_weights_map`."""
    x, g = capture_conv_io(model, conv, inputs, target)
    return unfold_weights_map(x, g, conv, aggregation, grid, method)


# --------------------------------------------------------------------------- benchmark


def build_model(name: str, seed: int = 0) -> nn.Module:
    return _timing.torchvision_model(name, seed)


def gradcam_layers(name: str, model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Layers at which NormGrad and Grad-CAM are compared."""
    if name.startswith("resnet"):
        return [("layer2", model.layer2), ("layer4", model.layer4)]
    feats = model.features
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    mid, last = convs[len(convs) // 2], convs[-1]
    return [(f"features.{mid}", feats[mid]), (f"features.{last}", feats[last])]


def _row_stats(times: Dict[str, List[float]], num: str, den: str) -> Dict[str, Any]:
    return {
        f"{num}_s": _timing.summarize(times[num]).as_dict(),
        f"{den}_s": _timing.summarize(times[den]).as_dict(),
        "ratio_of_medians": _timing.median(times[num]) / _timing.median(times[den]),
        "paired_ratio": _timing.paired_ratio(times[num], times[den]),
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from captum.attr import LayerGradCam
    from tqdm import tqdm

    from captum_normgrad import LayerNormGrad
    from captum_normgrad import _maps

    dev = torch.device(args.device)
    sync = _timing.device_sync(dev)
    results: Dict[str, Any] = {"gradcam": [], "weights": [], "map_stage": []}
    target = 3
    n_jobs = len(args.models) * len(args.sizes) * 2 + 2 * len(args.sizes)  # interleaved sets with progress
    bar = tqdm(total=n_jobs * args.repeats, desc=STEM, unit="round", disable=args.no_progress)

    # 1. order 0 vs LayerGradCam
    for name in args.models:
        model = build_model(name).to(dev)
        for size in args.sizes:
            gen = torch.Generator().manual_seed(size)
            x = torch.rand(args.batch, 3, size, size, generator=gen).to(dev)
            for lname, layer in gradcam_layers(name, model):
                gc, ng = LayerGradCam(model, layer), LayerNormGrad(model, layer)
                fns = {
                    "gradcam": lambda: gc.attribute(x, target),
                    "normgrad": lambda: ng.attribute(x, target),
                }
                times = _timing.interleaved_timings(fns, args.repeats, args.warmup, sync, bar.update)
                row = {"model": name, "size": size, "batch": args.batch, "layer": lname}
                row.update(_row_stats(times, "normgrad", "gradcam"))
                results["gradcam"].append(row)
        del model

    # 2./3. "weights" at resnet18 layer3 sizes
    model = build_model("resnet18").to(dev)
    conv = model.layer3[1].conv2
    geom = _maps.ConvGeometry.from_module(conv)
    ng = LayerNormGrad(model, conv)
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        x = torch.rand(args.batch, 3, size, size, generator=gen).to(dev)
        fns = {
            "conv1x1": lambda: ng.attribute(x, target),
            "weights": lambda: ng.attribute(x, target, virtual_layer="weights"),
        }
        times = _timing.interleaved_timings(fns, args.repeats, args.warmup, sync, bar.update)
        row = {"model": "resnet18", "layer": "layer3.1.conv2", "size": size, "batch": args.batch}
        row.update(_row_stats(times, "weights", "conv1x1"))
        # the explicit reference is slow (seconds per call): fewer rounds, paired with "weights"
        fns = {
            "weights": lambda: ng.attribute(x, target, virtual_layer="weights"),
            "unfold_outer": lambda: unfold_reference_attribute(model, conv, x, target),
        }
        ref = _timing.interleaved_timings(fns, args.ref_repeats, 0, sync)
        row["unfold_outer_s"] = _timing.summarize(ref["unfold_outer"]).as_dict()
        row["unfold_over_weights_paired"] = _timing.paired_ratio(ref["unfold_outer"], ref["weights"])
        results["weights"].append(row)

        x_in, g_out = capture_conv_io(model, conv, x, target)
        fns = {
            "ours": lambda: _maps.weights_map(x_in, g_out, geom),
            "unfold_factorised": lambda: unfold_weights_map(x_in, g_out, conv, method="factorised"),
        }
        times = _timing.interleaved_timings(fns, args.repeats, args.warmup, sync, bar.update)
        fns = {
            "ours": lambda: _maps.weights_map(x_in, g_out, geom),
            "unfold_outer": lambda: unfold_weights_map(x_in, g_out, conv),
        }
        ref = _timing.interleaved_timings(fns, args.ref_repeats, 0, sync)
        ours_map, ref_map = _maps.weights_map(x_in, g_out, geom), unfold_weights_map(x_in, g_out, conv)
        rel = float((ours_map - ref_map).abs().max() / ref_map.abs().max())
        results["map_stage"].append(
            {
                "size": size,
                "batch": args.batch,
                "x_in_shape": list(x_in.shape),
                "g_out_shape": list(g_out.shape),
                "ours_s": _timing.summarize(times["ours"]).as_dict(),
                "unfold_outer_s": _timing.summarize(ref["unfold_outer"]).as_dict(),
                "unfold_factorised_s": _timing.summarize(times["unfold_factorised"]).as_dict(),
                "outer_over_ours_paired": _timing.paired_ratio(ref["unfold_outer"], ref["ours"]),
                "factorised_over_ours_paired": _timing.paired_ratio(times["unfold_factorised"], times["ours"]),
                "max_rel_diff_vs_outer": rel,
            }
        )
    bar.close()
    return results


def targets(results: Dict[str, Any]) -> Dict[str, Any]:
    """Worst-case ratios against the issue's targets (paired ratios)."""
    worst_gc = max(r["paired_ratio"] for r in results["gradcam"])
    worst_w = max(r["paired_ratio"] for r in results["weights"])
    big = max(results["map_stage"], key=lambda r: r["size"])
    big_e2e = max(results["weights"], key=lambda r: r["size"])
    return {
        "order0_over_gradcam_worst": worst_gc,
        "order0_over_gradcam_target": TARGET_ORDER0,
        "order0_over_gradcam_met": worst_gc <= TARGET_ORDER0,
        "weights_over_order0_worst": worst_w,
        "weights_over_order0_target": TARGET_WEIGHTS,
        "weights_over_order0_met": worst_w <= TARGET_WEIGHTS,
        "unfold_over_weights_map_stage": big["outer_over_ours_paired"],
        "unfold_over_weights_end_to_end": big_e2e["unfold_over_weights_paired"],
        "unfold_size": big["size"],
        "unfold_target": TARGET_UNFOLD,
        "unfold_met": big["outer_over_ours_paired"] >= TARGET_UNFOLD,
    }


def to_markdown(payload: Dict[str, Any]) -> str:
    f = _timing.fmt_ms
    res, env, st, tg = payload["results"], payload["environment"], payload["settings"], payload["targets"]
    ok = {True: "met", False: "**not met**"}
    lines = [
        "### NormGrad order 0: speed against LayerGradCam and an unfold reference",
        "",
        f"{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, {env['torch_threads']} thread(s), "
        f"batch {st['batch']}, random-init torchvision models in eval mode, median of {st['repeats']} interleaved "
        f"rounds ({st['warmup']} warm-up; {st['ref_repeats']} for the slow explicit unfold reference). Ratios are medians of per-round ratios. {env['date_utc']}. "
        + _timing.describe_load(env),
        "",
        "**LayerNormGrad (1x1 virtual layer) vs LayerGradCam at the same layer** (target <= "
        f"{TARGET_ORDER0}x: {ok[tg['order0_over_gradcam_met']]}, worst {tg['order0_over_gradcam_worst']:.3f}x)",
        "",
        _timing.markdown_table(
            ["model", "px", "layer", "LayerGradCam ms", "LayerNormGrad ms", "ratio"],
            [
                [r["model"], r["size"], r["layer"], f(r["gradcam_s"]["median"]), f(r["normgrad_s"]["median"]),
                 f"{r['paired_ratio']:.3f}"]
                for r in res["gradcam"]
            ],
        ),
        "",
        f"**virtual_layer=\"weights\" at resnet18 layer3.1.conv2, end to end** (weights/1x1 target <= "
        f"{TARGET_WEIGHTS}x: {ok[tg['weights_over_order0_met']]}, worst {tg['weights_over_order0_worst']:.3f}x)",
        "",
        _timing.markdown_table(
            ["px", "1x1 ms", "weights ms", "weights / 1x1", "unfold reference ms", "unfold / weights"],
            [
                [r["size"], f(r["conv1x1_s"]["median"]), f(r["weights_s"]["median"]), f"{r['paired_ratio']:.3f}",
                 f(r["unfold_outer_s"]["median"]), f"{r['unfold_over_weights_paired']:.1f}"]
                for r in res["weights"]
            ],
        ),
        "",
        f"**Map stage only** (same captured tensors; target: unfold reference >= {TARGET_UNFOLD:g}x slower at "
        f"{tg['unfold_size']} px: {ok[tg['unfold_met']]}, {tg['unfold_over_weights_map_stage']:.1f}x)",
        "",
        _timing.markdown_table(
            ["px", "x_in", "g_out", "ours ms", "unfold outer ms", "unfold factorised ms", "outer / ours",
             "factorised / ours", "max rel. diff"],
            [
                [r["size"], "x".join(map(str, r["x_in_shape"])), "x".join(map(str, r["g_out_shape"])),
                 f(r["ours_s"]["median"]), f(r["unfold_outer_s"]["median"]), f(r["unfold_factorised_s"]["median"]),
                 f"{r['outer_over_ours_paired']:.1f}", f"{r['factorised_over_ours_paired']:.1f}",
                 f"{r['max_rel_diff_vs_outer']:.1e}"]
                for r in res["map_stage"]
            ],
        ),
        "",
        "The unfold reference builds each location's contribution g_u ι(x)_uᵀ from `F.unfold` patches, takes its "
        "Frobenius norm and folds it onto the input grid (`F.fold`); the factorised variant uses "
        "‖g_u‖·‖ι(x)_u‖ on the unfolded patches. Ours: patch norms by a box convolution of Σ_c x_c², "
        "accumulation by a transposed convolution. End to end, both routes share the same forward and backward "
        "pass, which takes most of the time of `\"weights\"` and bounds the end-to-end ratio; the map stage "
        "compares the two algorithms themselves.",
        "",
        f"Command: `{payload['command']}`",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (CI smoke test, a few seconds)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before")
    p.add_argument("--ref-repeats", type=int, default=None, help="rounds for the (slow) explicit unfold reference")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--models", nargs="+", default=None, choices=["resnet18", "vgg11"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (2 if quick else 15)
    args.ref_repeats = args.ref_repeats or (1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.batch = args.batch or (2 if quick else 8)
    args.sizes = args.sizes or ([32] if quick else [112, 160, 224])
    args.models = args.models or (["resnet18"] if quick else ["resnet18", "vgg11"])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _timing.torch_threads(args.threads):
        env = _timing.environment(args.device)
        results = run(args)
    env["loadavg_at_end"] = _timing.loadavg()
    return _timing.publish(STEM, __file__, argv, args, env, results, to_markdown, targets)


if __name__ == "__main__":
    raise SystemExit(main())
