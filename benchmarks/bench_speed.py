r"""Time and peak memory of every attribution method, ours and Captum's (issue #6).

Methods, all at the same convolution of each model (so that every method, including the
``"weights"`` virtual layer, explains the same point of the network):

* Captum: ``LayerGradCam``, ``LayerGradientXActivation``;
* ours, order 0 (``LayerNormGrad``): ``conv1x1`` (NormGrad), ``selective`` (``scaling`` +
  ``filter_norm``), ``weights`` (the convolution's own 3x3 weights);
* ours, order 1 (``LayerNormGradOrder1``): ``finite_difference`` (the paper), ``exact`` (HVP by
  forward-over-reverse), ``none`` (lookahead).

Models: torchvision ``resnet18``, ``resnet50``, ``vgg16`` with random weights in eval mode, several
batch sizes. Methods are timed interleaved in one process (see ``_timing.py``); the cheap methods
and the order-1 methods are timed in two interleaved groups (order 1 with fewer rounds, it takes
seconds per call), each group with ``LayerGradCam`` in every round, so every ratio to
``LayerGradCam`` is a median of per-round ratios. Peak memory: one extra call per method
(``_timing.peak_memory``: ``VmHWM`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Run from the repository root::

    python benchmarks/bench_speed.py                     # CPU, writes benchmarks/results/bench_speed.{json,md}
    python benchmarks/bench_speed.py --device cuda       # on a GPU: writes bench_speed_cuda.{json,md}
    python benchmarks/bench_speed.py --quick --out /tmp/bench                     # CI smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

from captum_normgrad._layers import get_layer  # noqa: E402

STEM = "bench_speed"

# the explained point: a 3x3 convolution in the second half of each network
LAYERS: Dict[str, str] = {
    "resnet18": "layer3.1.conv2",
    "resnet50": "layer3.5.conv2",
    "vgg16": "features.21",
}

#: row label -> (name in captum_normgrad.registry.METHODS, extra attribute() options): the registry
#: alone says what each name computes; the labels are those of the published tables.
ROWS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "LayerGradCam": ("gradcam", {}),
    "LayerGradientXActivation": ("gradxact", {}),
    "NormGrad": ("normgrad", {}),
    "NormGrad selective": ("normgrad_selective", {}),
    "NormGrad weights": ("normgrad_weights", {}),
    "Order 1 finite diff.": ("normgrad_order1", {"hessian": "finite_difference"}),
    "Order 1 exact HVP": ("normgrad_order1", {"hessian": "exact"}),
    "Order 1 lookahead": ("normgrad_lookahead", {}),
}


def _order(label: str) -> int:
    from captum_normgrad.registry import get_method

    return get_method(ROWS[label][0]).order


FAST = tuple(k for k in ROWS if _order(k) == 0)
ORDER1 = tuple(k for k in ROWS if _order(k) == 1)
METHODS = FAST + ORDER1


def method_fns(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: List[int]) -> Dict[str, Callable[[], Any]]:
    """Zero-argument callables, one per method, on the given batch (the attribution objects built once)."""
    from captum_normgrad.registry import get_method

    fns: Dict[str, Callable[[], Any]] = {}
    for label, (name, extra) in ROWS.items():
        bound = get_method(name).build(model, [layer])
        fns[label] = lambda b=bound, kw=extra: b.attribute(x, target, **kw)
    return fns


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    dev = torch.device(args.device)
    sync = _timing.device_sync(dev)
    rows: List[Dict[str, Any]] = []
    methods = [m for m in METHODS if m in args.methods]
    fast = [m for m in methods if m in FAST and m != "LayerGradCam"]
    slow = [m for m in methods if m in ORDER1]
    total = len(args.models) * len(args.batches) * ((args.repeats if fast else 0) + (args.order1_repeats if slow else 0))
    bar = tqdm(total=total, desc=STEM, unit="round", disable=args.no_progress)
    for name in args.models:
        model = _timing.torchvision_model(name, device=dev)
        layer = get_layer(model, LAYERS[name])
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.rand(batch, 3, args.size, args.size, generator=gen).to(dev)
            target = torch.randint(0, 1000, (batch,), generator=gen).tolist()
            fns = method_fns(model, layer, x, target)
            times: Dict[str, List[float]] = {}
            ratios: Dict[str, float] = {}
            for group, reps in ((fast, args.repeats), (slow, args.order1_repeats)):
                if not group:
                    continue
                t = _timing.interleaved_timings(
                    {k: fns[k] for k in ["LayerGradCam", *group]}, reps, args.warmup, sync, bar.update
                )
                for k in group:
                    times[k] = t[k]
                    ratios[k] = _timing.paired_ratio(t[k], t["LayerGradCam"])
                times.setdefault("LayerGradCam", []).extend(t["LayerGradCam"])
            ratios["LayerGradCam"] = 1.0
            for meth in ["LayerGradCam", *fast, *slow]:
                peak, how = _timing.peak_memory(fns[meth], dev)
                st = _timing.summarize(times[meth])
                rows.append({
                    "model": name, "layer": LAYERS[name], "size": args.size, "batch": batch, "method": meth,
                    "time_s": st.as_dict(), "per_image_s": st.median / batch, "ratio_to_gradcam": ratios[meth],
                    "peak_bytes": peak, "memory_method": how,
                })
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


def to_markdown(payload: Dict[str, Any]) -> str:
    rows, env, st = payload["results"], payload["environment"], payload["settings"]
    f, mib = _timing.fmt_ms, _timing.fmt_mib
    lines = [
        "### Speed and memory of every method" + (f" ({env['device']})" if env["device"] != "cpu" else ""),
        "",
        f"{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, captum {env['captum']}, "
        f"{env['torch_threads']} thread(s); torchvision models with random weights (eval), {st['size']} px; "
        f"median of {st['repeats']} interleaved rounds for Captum and order 0, {st['order1_repeats']} for order 1 "
        f"({st['warmup']} warm-up), ratio to LayerGradCam = median of per-round ratios; peak memory above the "
        f"memory in use before the call ({rows[0]['memory_method'] if rows else '-'}). {env['date_utc']}. "
        + _timing.describe_load(env),
    ]
    batches = st["batches"]
    for model in st["models"]:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        head = ["method"]
        for b in batches:
            head += [f"batch {b}: ms", "x Grad-CAM", "peak MiB"]
        table = []
        for meth in dict.fromkeys(r["method"] for r in mrows):
            cells = [meth]
            for b in batches:
                r = next((r for r in mrows if r["method"] == meth and r["batch"] == b), None)
                cells += ["–", "–", "–"] if r is None else [
                    f(r["time_s"]["median"]), f"{r['ratio_to_gradcam']:.2f}", mib(r["peak_bytes"])]
            table.append(cells)
        lines += ["", f"**{model}** (at `{mrows[0]['layer']}`)", "", _timing.markdown_table(head, table)]
    lines += ["", f"Command: `{payload['command']}`"]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18, tiny images, 1 round (CI smoke test)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--size", type=int, default=None, help="image size in px")
    p.add_argument("--repeats", type=int, default=None, help="rounds for Captum and order-0 methods")
    p.add_argument("--order1-repeats", type=int, default=None, help="rounds for order-1 methods")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help="subset of: " + ", ".join(METHODS))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    q, gpu = args.quick, args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    args.models = args.models or (["resnet18"] if q else ["resnet18", "resnet50", "vgg16"])
    args.batches = args.batches or ([1] if q else ([1, 8, 32] if gpu else [1, 8]))
    args.size = args.size or (32 if q else (224 if gpu else 112))
    args.repeats = args.repeats or (1 if q else (20 if gpu else 7))
    args.order1_repeats = args.order1_repeats or (1 if q else (5 if gpu else 3))
    args.warmup = args.warmup if args.warmup is not None else (0 if q else 1)
    if "LayerGradCam" not in args.methods:
        args.methods = ["LayerGradCam", *args.methods]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _timing.torch_threads(args.threads):
        env = _timing.environment(args.device)
        rows = run(args)
    env["loadavg_at_end"] = _timing.loadavg()
    stem = STEM if not args.device.startswith("cuda") else f"{STEM}_cuda"
    return _timing.publish(stem, __file__, argv, args, env, rows, to_markdown)


if __name__ == "__main__":
    raise SystemExit(main())
