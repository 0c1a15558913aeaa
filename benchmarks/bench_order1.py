r"""Speed and memory of NormGrad order 1 (``LayerNormGradOrder1``) against order 0 (issue #3).

Measured, interleaved in one process (see ``_timing.py``), medians of repeated runs, torchvision
``resnet18`` with random weights in eval mode:

1. **Time per image at batch 8**: ``LayerNormGradOrder1`` with ``hessian="finite_difference"``
   (the paper), ``"exact"`` (forward-over-reverse HVP) and ``"none"`` (lookahead), against
   ``LayerNormGrad`` with the same objective (per-sample cross-entropy, ``loss_fn``). Targets
   (issue #14, restated from the first release's 4.5x): finite difference <= 8x order 0 at
   ``layer2``/``layer3`` and <= 11x at ``layer4``; lookahead <= 4.5x.
   Two yardsticks are timed in the same rounds:

   * ``naive loop``: :func:`naive_order1`, one sample at a time, four plain autograd passes on
     parameter dictionaries (batch 1, shared-weight convolutions): what a straightforward
     per-sample implementation costs;
   * ``pass floor``: ``2 x (forward + backward with parameter gradients) + 2 x (forward + backward
     to the layer)`` on the whole batch with *shared* weights: the cost of the four passes if
     per-sample weights were free. Its ratio to order 0 bounds what any implementation of the four
     passes can reach on this machine.

2. **Peak memory against batch size** (``_timing.peak_memory``: ``VmHWM`` on CPU,
   ``max_memory_allocated`` on CUDA) for order 0 and the three order-1 variants, and ResNet-50 at
   batch 16 (the issue's "fits in a few GB").

Run from the repository root::

    python benchmarks/bench_order1.py             # full run -> benchmarks/results/bench_order1.{json,md}
    python benchmarks/bench_order1.py --quick --out /tmp/bench   # CI smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

STEM = "bench_order1"
TARGET_ORDER1 = {"layer2": 8.0, "layer3": 8.0, "layer4": 11.0}  # finite difference, per layer
TARGET_LOOKAHEAD = 4.5
VARIANTS = ("finite_difference", "exact", "none")


# --------------------------------------------------------------------------- yardsticks


class _LayerTap:
    """Forward hook that makes the layer output a differentiable tensor and remembers it."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.act: Optional[Tensor] = None
        self.handle: Any = None

    def __enter__(self) -> "_LayerTap":
        def hook(mod: nn.Module, inp: Tuple[Any, ...], out: Tensor) -> Tensor:
            o = out if out.requires_grad else out.detach().requires_grad_()
            self.act = o
            return o

        self.handle = self.layer.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _split_params(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    named = dict(model.named_parameters())
    theta = {k: p.detach() for k, p in named.items() if p.requires_grad}
    consts = {k: p.detach() for k, p in named.items() if not p.requires_grad}
    consts.update({k: b.detach() for k, b in model.named_buffers()})
    return theta, consts


def naive_order1(
    model: nn.Module,
    layer: nn.Module,
    inputs: Tensor,
    target: Sequence[int],
    epsilon: float = 5e-4,
    adversarial: bool = False,
) -> Tensor:
    r"""Order-1 NormGrad (finite difference) one sample at a time with four plain autograd passes.

    For each sample: ``g = grad l(theta)``; ``theta' = theta -+ eps g``; at ``theta'`` the layer
    activation ``x``, its gradient ``g'`` and ``v = grad l(theta')``; ``h = 0.5/||v||``;
    ``theta_pm = theta +- h v`` give ``g_pm``; the map is ``||g' -+ eps/(2h) (g_+ - g_-)|| ||x||``
    (the Hessian term is dropped when ``v = 0``). Parameters live in dictionaries passed to
    ``functional_call``: the model is never written to. Loss: cross-entropy with the target.
    """
    theta, consts = _split_params(model)
    names = list(theta)
    sign = 1.0 if adversarial else -1.0
    maps = []
    with _LayerTap(layer) as tap, torch.enable_grad():

        def passes(params: Dict[str, Tensor], xi: Tensor, ti: Tensor, need_params: bool) -> Tuple[Tensor, Tensor, List[Tensor]]:
            ps = {k: v.detach().requires_grad_(need_params) for k, v in params.items()}
            loss = F.cross_entropy(functional_call(model, (ps, consts), (xi,)), ti, reduction="sum")
            act = tap.act
            assert act is not None
            gs = torch.autograd.grad(loss, [act, *(ps.values() if need_params else [])])
            return act.detach(), gs[0], list(gs[1:])

        for i in range(inputs.shape[0]):
            xi = inputs[i : i + 1]
            ti = torch.as_tensor([int(target[i])], device=inputs.device)
            _, _, g1 = passes(theta, xi, ti, True)
            theta_p = {k: theta[k] + sign * epsilon * g for k, g in zip(names, g1)}
            act, g_p, v = passes(theta_p, xi, ti, True)
            vnorm = torch.sqrt(sum(t.square().sum() for t in v))
            combined = g_p
            if float(vnorm) > 0:
                h = 0.5 / vnorm
                _, g_plus, _ = passes({k: theta[k] + h * t for k, t in zip(names, v)}, xi, ti, False)
                _, g_minus, _ = passes({k: theta[k] - h * t for k, t in zip(names, v)}, xi, ti, False)
                combined = g_p + sign * epsilon / (2 * h) * (g_plus - g_minus)
            maps.append(combined.norm(dim=1, keepdim=True) * act.norm(dim=1, keepdim=True))
    return torch.cat(maps, 0)


def pass_full(model: nn.Module, inputs: Tensor, target: Tensor) -> List[Tensor]:
    """Batched forward + backward with parameter gradients (shared weights, no writes to the model)."""
    theta, consts = _split_params(model)
    ps = {k: v.detach().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        loss = F.cross_entropy(functional_call(model, (ps, consts), (inputs,)), target, reduction="sum")
        return list(torch.autograd.grad(loss, list(ps.values())))


def pass_act(model: nn.Module, layer: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """Batched forward + backward down to the layer's output only (shared weights)."""
    theta, consts = _split_params(model)
    with _LayerTap(layer) as tap, torch.enable_grad():
        loss = F.cross_entropy(functional_call(model, (theta, consts), (inputs,)), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, tap.act)
    return g


# --------------------------------------------------------------------------- benchmark


def _layer(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def has_strategy() -> bool:
    """Whether ``LayerNormGradOrder1.attribute`` takes ``strategy`` ("auto" | "vmap" | "loop")."""
    import inspect

    from captum_normgrad import LayerNormGradOrder1

    return "strategy" in inspect.signature(LayerNormGradOrder1.attribute).parameters


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from tqdm import tqdm

    from captum_normgrad import LayerNormGrad, LayerNormGradOrder1, per_sample_cross_entropy

    args.vmap = args.vmap and has_strategy()

    dev = torch.device(args.device)
    sync = _timing.device_sync(dev)
    results: Dict[str, Any] = {"speed": [], "memory": []}
    model = _timing.torchvision_model("resnet18", device=dev)
    bar = tqdm(total=len(args.sizes) * len(args.layers) * args.repeats, desc=STEM, unit="round",
               disable=args.no_progress)
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        x = torch.rand(args.batch, 3, size, size, generator=gen).to(dev)
        target = torch.randint(0, 1000, (args.batch,), generator=gen).to(dev)
        tlist = target.tolist()
        for lname in args.layers:
            layer = _layer(model, lname)
            o0, o1 = LayerNormGrad(model, layer), LayerNormGradOrder1(model, layer)
            fns = {
                "order0": lambda: o0.attribute(x, tlist, loss_fn=per_sample_cross_entropy),
                **{v: (lambda v=v: o1.attribute(x, tlist, hessian=v)) for v in VARIANTS},
                "fd_loop": lambda: o1.attribute(x, tlist, strategy="loop"),
                **({"fd_vmap": lambda: o1.attribute(x, tlist, strategy="vmap")} if args.vmap else {}),
                "naive_loop": lambda: naive_order1(model, layer, x, tlist),
                "pass_full": lambda: pass_full(model, x, target),
                "pass_act": lambda: pass_act(model, layer, x, target),
            }
            times = _timing.interleaved_timings(fns, args.repeats, args.warmup, sync, bar.update)
            ours, naive = o1.attribute(x, tlist), naive_order1(model, layer, x, tlist)
            rel = float((ours - naive).abs().max() / naive.abs().max())
            floor = [2 * a + 2 * b for a, b in zip(times["pass_full"], times["pass_act"])]
            row: Dict[str, Any] = {"model": "resnet18", "layer": lname, "size": size, "batch": args.batch,
                                   "max_rel_diff_naive_vs_ours": rel}
            for name in fns:
                row[f"{name}_s"] = _timing.summarize(times[name]).as_dict()
                row[f"{name}_per_image_s"] = _timing.median(times[name]) / args.batch
                if name != "order0":
                    row[f"{name}_over_order0"] = _timing.paired_ratio(times[name], times["order0"])
            row["floor_s"] = _timing.summarize(floor).as_dict()
            row["floor_over_order0"] = _timing.paired_ratio(floor, times["order0"])
            row["exact_over_finite_difference"] = _timing.paired_ratio(times["exact"], times["finite_difference"])
            results["speed"].append(row)
    bar.close()

    # peak memory against batch size
    layer = _layer(model, args.layers[0])
    o0, o1 = LayerNormGrad(model, layer), LayerNormGradOrder1(model, layer)
    size = args.memory_size
    for batch in tqdm(args.memory_batches, desc=f"{STEM} memory", disable=args.no_progress):
        gen = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, 3, size, size, generator=gen).to(dev)
        tl = torch.randint(0, 1000, (batch,), generator=gen).tolist()
        row = {"model": "resnet18", "layer": args.layers[0], "size": size, "batch": batch}
        peak, method = _timing.peak_memory(lambda: o0.attribute(x, tl, loss_fn=per_sample_cross_entropy), dev)
        row["order0_bytes"], row["method"] = peak, method
        for v in VARIANTS:
            row[f"{v}_bytes"], _ = _timing.peak_memory(lambda: o1.attribute(x, tl, hessian=v), dev)
        row["fd_chunk2_bytes"], _ = _timing.peak_memory(lambda: o1.attribute(x, tl, chunk_size=2), dev)
        row["fd_loop_bytes"], _ = _timing.peak_memory(lambda: o1.attribute(x, tl, strategy="loop"), dev)
        results["memory"].append(row)
    if args.resnet50_batch:
        del model, o0, o1
        r50 = _timing.torchvision_model("resnet50", device=dev)
        batch = args.resnet50_batch
        gen = torch.Generator().manual_seed(50)
        x = torch.rand(batch, 3, size, size, generator=gen).to(dev)
        tl = torch.randint(0, 1000, (batch,), generator=gen).tolist()
        o1 = LayerNormGradOrder1(r50, r50.layer3)
        peak, method = _timing.peak_memory(lambda: o1.attribute(x, tl), dev)
        results["resnet50"] = {"model": "resnet50", "layer": "layer3", "size": size, "batch": batch,
                               "finite_difference_bytes": peak, "method": method}
    return results


def targets(results: Dict[str, Any]) -> Dict[str, Any]:
    worst = max(r["finite_difference_over_order0"] for r in results["speed"])
    met = all(r["finite_difference_over_order0"] <= TARGET_ORDER1.get(r["layer"], 8.0) for r in results["speed"])
    worst_la = max(r["none_over_order0"] for r in results["speed"])
    return {
        "order1_over_order0_worst": worst,
        "order1_over_order0_target": TARGET_ORDER1,
        "order1_over_order0_met": met,
        "lookahead_over_order0_worst": worst_la,
        "lookahead_over_order0_target": TARGET_LOOKAHEAD,
        "lookahead_over_order0_met": worst_la <= TARGET_LOOKAHEAD,
        "floor_over_order0_best": min(r["floor_over_order0"] for r in results["speed"]),
    }


def to_markdown(payload: Dict[str, Any]) -> str:
    f, mib = _timing.fmt_ms, _timing.fmt_mib
    res, env, st, tg = payload["results"], payload["environment"], payload["settings"], payload["targets"]
    ok = {True: "met", False: "**not met**"}
    has_vmap = all("fd_vmap_s" in r for r in res["speed"])
    speed_rows = []
    for r in res["speed"]:
        speed_rows.append([
            r["layer"], r["size"], f(r["order0_per_image_s"]),
            f"{f(r['finite_difference_per_image_s'])} ({r['finite_difference_over_order0']:.1f}x)",
            f"{f(r['exact_per_image_s'])} ({r['exact_over_order0']:.1f}x)",
            f"{f(r['none_per_image_s'])} ({r['none_over_order0']:.1f}x)",
            *([f"{f(r['fd_loop_per_image_s'])} ({r['fd_loop_over_order0']:.1f}x)"] if "fd_loop_s" in r else []),
            *([f"{f(r['fd_vmap_per_image_s'])} ({r['fd_vmap_over_order0']:.1f}x)"] if has_vmap else []),
            f"{f(r['naive_loop_per_image_s'])} ({r['naive_loop_over_order0']:.1f}x)",
            f"{f(r['floor_s']['median'] / r['batch'])} ({r['floor_over_order0']:.1f}x)",
            f"{r['max_rel_diff_naive_vs_ours']:.1e}",
        ])
    mem_rows = [
        [r["batch"], mib(r["order0_bytes"]), mib(r["finite_difference_bytes"]),
         mib(r.get("fd_chunk2_bytes")), mib(r.get("fd_loop_bytes")),
         mib(r["exact_bytes"]), mib(r["none_bytes"])]
        for r in res["memory"]
    ]
    lines = [
        "### NormGrad order 1: time per image and peak memory",
        "",
        f"{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, {env['torch_threads']} thread(s), "
        f"resnet18 with random weights (eval), batch {st['batch']}, median of {st['repeats']} interleaved rounds "
        f"({st['warmup']} warm-up); ratios are medians of per-round ratios to order 0 with the same objective "
        f"(`LayerNormGrad(..., loss_fn=per_sample_cross_entropy)`). {env['date_utc']}. "
        + _timing.describe_load(env),
        "",
        "**Time per image, ms (ratio to order 0)** — targets (issue #14): finite difference <= "
        + ", ".join(f"{v:g}x at {k}" for k, v in TARGET_ORDER1.items())
        + f": {ok[tg['order1_over_order0_met']]} (worst per layer: "
        + ", ".join(
            f"{layer} {max(r['finite_difference_over_order0'] for r in res['speed'] if r['layer'] == layer):.1f}x"
            for layer in dict.fromkeys(r["layer"] for r in res["speed"])
        )
        + "); lookahead <= "
        f"{TARGET_LOOKAHEAD:g}x: {ok[tg.get('lookahead_over_order0_met', False)]} "
        f"(worst {tg.get('lookahead_over_order0_worst', float('nan')):.1f}x)",
        "",
        _timing.markdown_table(
            ["layer", "px", "order 0", "order 1 finite diff.", "order 1 exact HVP", "order 1 lookahead",
             *(["order 1 finite diff., strategy='loop'"] if all("fd_loop_s" in r for r in res["speed"]) else []),
             *(["order 1 finite diff., strategy='vmap'"] if has_vmap else []),
             "naive per-sample loop", "pass floor", "naive vs ours rel. diff"],
            speed_rows,
        ),
        "",
        "Order 1 columns use the default `strategy=\"auto\"`: `\"batched\"` (whole-batch passes with "
        "per-sample parameters) where it applies, as here; `hessian=\"exact\"` runs per sample (the loop). "
        "The `strategy='loop'` column is the previous default, a loop of batch-1 passes. "
        "*naive per-sample loop*: four plain autograd passes per sample, batch 1 (`naive_order1` in the script). "
        "*pass floor*: 2 x (forward + backward with parameter gradients) + 2 x (forward + backward to the layer) "
        "on the whole batch with shared weights — what the four passes would cost if per-sample weights were "
        "free; order 0 needs one forward and a backward that stops at the layer and computes no parameter "
        f"gradient, so the floor alone is {tg['floor_over_order0_best']:.1f}x order 0 or more here.",
        "",
        f"**Peak memory, MiB above the memory in use before the call** ({res['memory'][0]['method']}; "
        f"resnet18 {res['memory'][0]['layer']}, {res['memory'][0]['size']} px)",
        "",
        _timing.markdown_table(["batch", "order 0", "order 1 finite diff.", "finite diff., chunk_size=2",
                                "finite diff., strategy='loop'", "order 1 exact HVP", "order 1 lookahead"],
                               mem_rows),
        "",
        "The batched strategy holds every sample's per-sample gradients of a chunk at once (dense where a "
        "layer has many locations, factored G A^T where it has few) and the activations of whole-batch "
        "passes: `chunk_size` trades that memory for speed (`chunk_size=2` column; the loop holds one "
        "example at a time).",
    ]
    if "resnet50" in res:
        r = res["resnet50"]
        lines += ["", f"ResNet-50 ({r['layer']}, {r['size']} px), batch {r['batch']}, order 1 finite difference: "
                  f"peak {mib(r['finite_difference_bytes'])} MiB ({r['method']})."]
    lines += ["", f"Command: `{payload['command']}`"]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (CI smoke test)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--layers", nargs="+", default=None, help="resnet18 module names (default layer2 layer4)")
    p.add_argument("--memory-batches", type=int, nargs="+", default=None)
    p.add_argument("--memory-size", type=int, default=None)
    p.add_argument("--resnet50-batch", type=int, default=None, help="0 to skip the ResNet-50 memory figure")
    p.add_argument("--no-vmap", dest="vmap", action="store_false",
                   help="do not also time strategy='vmap' (the order-1 default on CUDA) on this device")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 1)
    args.batch = args.batch or (1 if q else 8)
    args.sizes = args.sizes or ([32] if q else [112])
    args.layers = args.layers or (["layer2"] if q else ["layer2", "layer4"])
    args.memory_batches = args.memory_batches or ([1] if q else [1, 2, 4, 8, 16])
    args.memory_size = args.memory_size or (32 if q else 112)
    if args.resnet50_batch is None:
        args.resnet50_batch = 0 if q else 16
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
