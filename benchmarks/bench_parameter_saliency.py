r"""Speed of parameter-saliency profiles: one batched pass vs a per-sample loop (issue 14).

Measurements, interleaved in one process (see ``_timing.py``), medians of repeated rounds, for
each image size (default 64 and 112 px):

1. Filter-wise profiles of 32 samples on torchvision ``resnet18`` (random init, eval mode, 4800
   convolution filters): :meth:`ParameterSaliency.profiles` with its default engine (one batched
   forward and backward, per-sample weight gradients as activation x output gradient, reduced in
   cache-sized blocks), with ``strategy="vmap"`` (``chunk_size=8``), against a straightforward loop
   (one ``autograd.grad`` per sample on the model) and against the **ceiling**: one batched
   forward and backward with the *summed* weight gradients (what any per-sample method must at
   least do). Targets: batched >= 2.5x the loop at 64 px and >= 1.5x at 112 px.
   Accuracy: the largest layer-relative difference (per sample and parameter,
   ``max |p - ref| / max |ref|``) of each method from the float32 loop and from the same loop in
   float64, and of the float32 loop from float64 (its own float32 conditioning, see
   ``docs/parameter_saliency.md``).
2. ``fit`` throughput (samples/s) over a loader of random images, batch 16.
3. Validation on the benchmark ``ShapesResNet`` (committed trained weights): statistics fitted on
   validation images, the misclassified test images explained; layer-depth bias of the top-k
   filters (naive, standardised, POT), turning the top-k filters off vs random and least salient,
   and one SGD step on the top-k filters with its effect on nearest neighbours in saliency space.

``--parts`` runs a subset; the parts not run keep their previous results from the JSON file in
the output folder.

Run from the repository root (2 threads, as recorded in docs/parameter_saliency.md)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_parameter_saliency.py --threads 2 --parts speed
    python benchmarks/bench_parameter_saliency.py --quick --out /tmp/bench   # CI smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

STEM = "bench_parameter_saliency"
#: per image size: the batched engine's speed-up over the per-sample loop (issue 14)
TARGETS = {64: 2.5, 112: 1.5}


def loop_profiles(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The straightforward reference: one forward/backward per sample, ``autograd.grad`` of the conv weights."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, weights)
        rows.append(torch.cat([g.abs().flatten(1).mean(1) for g in grads]))
    return torch.stack(rows)


def ceiling_pass(model: nn.Module, x: Tensor, y: Tensor) -> Any:
    """One batched forward and backward with the summed conv weight gradients (no per-sample work)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), weights)


def layer_relative_diff(got: Tensor, ref: Tensor, slices: Sequence[Any]) -> float:
    """Largest ``max |got - ref| / max |ref|`` over samples and parameters (each layer on its own scale)."""
    worst = 0.0
    for _, sl in slices:
        scale = ref[:, sl].abs().amax(1).clamp_min(1e-30)
        worst = max(worst, float(((got[:, sl].double() - ref[:, sl].double()).abs().amax(1) / scale).max()))
    return worst


def build_model(name: str, device: torch.device) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=1000).eval().to(device)


def run_size(args: argparse.Namespace, model: nn.Module, size: int, dev: torch.device) -> Dict[str, Any]:
    import copy

    from tqdm import tqdm

    from captum_normgrad.parameter_saliency import ParameterSaliency

    sync = _timing.device_sync(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, size, size, generator=gen).to(dev)
    y = torch.randint(0, 1000, (args.samples,), generator=gen).to(dev)
    batched = ParameterSaliency(model, mode="naive")
    vmapped = ParameterSaliency(model, mode="naive", strategy="vmap", chunk_size=args.chunk)
    fns: Dict[str, Callable[[], Any]] = {
        "loop_autograd": lambda: loop_profiles(model, x, y),
        "batched": lambda: batched.profiles(x, y),
        "ceiling_summed_grads": lambda: ceiling_pass(model, x, y),
    }
    if not args.no_vmap:
        fns[f"vmap_chunk{args.chunk}"] = lambda: vmapped.profiles(x, y)
    bar = tqdm(total=args.repeats, desc=f"{STEM} {size}px", unit="round", disable=args.no_progress)
    times = _timing.interleaved_timings(fns, args.repeats, args.warmup, sync, bar.update)
    bar.close()

    slices = batched.feature_slices()
    ref32 = loop_profiles(model, x, y)
    m64 = copy.deepcopy(model).double()
    ref64 = loop_profiles(m64, x.double(), y)
    results = {name: fn() for name, fn in fns.items() if name not in ("loop_autograd", "ceiling_summed_grads")}
    rows: List[Dict[str, Any]] = []
    for name, ts in times.items():
        row: Dict[str, Any] = {"method": name, "time_s": _timing.summarize(ts).as_dict()}
        row["samples_per_s"] = args.samples / row["time_s"]["median"]
        if name != "loop_autograd":
            row["speedup_vs_loop_paired"] = _timing.paired_ratio(times["loop_autograd"], ts)
        if name in results:
            row["max_rel_diff_vs_loop"] = layer_relative_diff(results[name], ref32, slices)
            row["max_rel_diff_vs_float64"] = layer_relative_diff(results[name], ref64, slices)
        if name == "loop_autograd":
            row["max_rel_diff_vs_float64"] = layer_relative_diff(ref32, ref64, slices)
        rows.append(row)
    return {"size": size, "profiles": rows, "loadavg_at_end": _timing.loadavg()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from captum_normgrad.parameter_saliency import ParameterSaliency

    dev = torch.device(args.device)
    sync = _timing.device_sync(dev)
    model = build_model(args.model, dev)
    sizes = [run_size(args, model, size, dev) for size in args.sizes]

    # fit throughput
    gen = torch.Generator().manual_seed(1)
    size = args.sizes[0]
    loader = [
        (torch.randn(args.fit_batch, 3, size, size, generator=gen).to(dev),
         torch.randint(0, 1000, (args.fit_batch,), generator=gen).to(dev))
        for _ in range(args.fit_batches)
    ]
    fitter = ParameterSaliency(model)
    sync()
    t0 = time.perf_counter()
    fitter.fit(loader, progress=not args.no_progress)
    sync()
    fit_s = time.perf_counter() - t0
    n_fit = args.fit_batch * args.fit_batches
    return {
        "model": args.model,
        "num_filters": fitter.num_features,
        "engine": fitter.resolve_strategy(),
        "sizes": sizes,
        "fit": {"samples": n_fit, "batch": args.fit_batch, "size": size, "time_s": fit_s,
                "samples_per_s": n_fit / fit_s},
    }


def run_validation(args: argparse.Namespace) -> Dict[str, Any]:
    from torch.utils.data import DataLoader

    from captum_normgrad.datasets import ShapesDataset
    from captum_normgrad.models import load_benchmark_model, weights_path
    from captum_normgrad.parameter_saliency import (
        ParameterSaliency,
        POTScorer,
        fine_tune_experiment,
        layer_depth_bias,
        turn_off_experiment,
    )

    trained = weights_path("resnet").is_file()
    if not trained and not args.allow_random_weights:
        return {"skipped": f"no trained weights at {weights_path('resnet')} (run benchmarks/train_models.py)"}
    torch.manual_seed(0)
    model = load_benchmark_model("resnet", weights="default" if trained else None)
    progress = not args.no_progress
    ps = ParameterSaliency(model)
    t0 = time.perf_counter()
    ps.fit(DataLoader(ShapesDataset(args.val_size, split="val"), batch_size=50), progress=progress, keep_profiles=True)
    fit_s = time.perf_counter() - t0
    pot = POTScorer(progress=progress).fit(ps.reference_profiles)
    images, labels, _ = ShapesDataset(args.test_size, split="test").tensors()
    with torch.no_grad():
        pred = model(images).argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()
    out: Dict[str, Any] = {
        "weights": "trained" if trained else "random (--allow-random-weights)",
        "num_filters": ps.num_features,
        "reference_samples": args.val_size,
        "fit_samples_per_s": args.val_size / fit_s,
        "test_samples": args.test_size,
        "misclassified": int(wrong.numel()),
        "pot_fitted_filters": int(pot.fitted.sum()),
    }
    if wrong.numel() < 2:
        out["skipped"] = "fewer than 2 misclassified test images"
        return out
    xw, yw = images[wrong], labels[wrong]
    prof = ps.profiles(xw, yw)
    out["depth_bias"] = list(layer_depth_bias(ps, prof, k=args.k, pot=pot))
    ks = [k for k in (1, 5, 10, 25, 50) if k <= ps.num_features]
    out["turn_off"] = {
        "standardized": list(turn_off_experiment(ps, xw, yw, ks=ks, n_random=args.n_random, progress=progress)),
        "pot": list(turn_off_experiment(ps, xw, yw, ks=ks, ranking=pot, n_random=args.n_random, progress=progress)),
    }
    n_nb = min(5, int(wrong.numel()) - 1)
    out["fine_tune"] = {
        "k": args.k, "lr": 1e-3, "steps": 1, "n_neighbors": n_nb,
        "table": list(fine_tune_experiment(ps, xw, yw, k=args.k, lr=1e-3, steps=1, n_neighbors=n_nb, progress=progress)),
    }
    return out


def targets(results: Dict[str, Any]) -> Dict[str, Any]:
    if "sizes" not in results:
        return {}
    out: Dict[str, Any] = {}
    for part in results["sizes"]:
        rows = {r["method"]: r for r in part["profiles"]}
        target = TARGETS.get(part["size"])
        speedup = rows["batched"]["speedup_vs_loop_paired"]
        out[str(part["size"])] = {
            "speedup_vs_loop": speedup,
            "ceiling_vs_loop": rows["ceiling_summed_grads"]["speedup_vs_loop_paired"],
            "target": target,
            "met": None if target is None else speedup >= target,
            "max_rel_diff_vs_loop": rows["batched"]["max_rel_diff_vs_loop"],
            "max_rel_diff_vs_float64": rows["batched"]["max_rel_diff_vs_float64"],
            "equal_results": rows["batched"]["max_rel_diff_vs_float64"] <= 1e-5,
        }
    return out


def speed_markdown(part: Dict[str, Any]) -> List[str]:
    res, env, st, tg = part["results"], part["environment"], part["settings"], part["targets"]
    if "sizes" not in res:
        return ["(speed part from an older version of this script: rerun it)"]
    f = _timing.fmt_ms
    ok = {True: "met", False: "**not met**", None: "no target"}
    lines = [
        f"{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, {env['torch_threads']} thread(s), "
        f"torchvision {res['model']} (random init, eval), {res['num_filters']} filters, {st['samples']} samples; "
        f"median of {st['repeats']} interleaved rounds ({st['warmup']} warm-up); speed-ups are medians of per-round "
        f"ratios. {env['date_utc']}; {_timing.describe_load(env)} Engine chosen by `strategy=\"auto\"`: "
        f"`{res['engine']}`.",
    ]
    for sp in res["sizes"]:
        t = tg[str(sp["size"])]
        rows = []
        for r in sp["profiles"]:
            rows.append([
                r["method"], f(r["time_s"]["median"]), f"{r['samples_per_s']:.2f}",
                f"{r['speedup_vs_loop_paired']:.2f}" if "speedup_vs_loop_paired" in r else "1 (reference)",
                f"{r['max_rel_diff_vs_loop']:.1e}" if "max_rel_diff_vs_loop" in r else "–",
                f"{r['max_rel_diff_vs_float64']:.1e}" if "max_rel_diff_vs_float64" in r else "–",
            ])
        target = "" if t["target"] is None else f"target >= {t['target']:g}x: {ok[t['met']]}; "
        lines += [
            "",
            f"**{sp['size']}x{sp['size']} px** ({target}batched {t['speedup_vs_loop']:.2f}x the loop, ceiling "
            f"{t['ceiling_vs_loop']:.2f}x; load average at the end {sp.get('loadavg_at_end')})",
            "",
            _timing.markdown_table(
                ["method", "ms", "samples/s", "speed-up vs loop", "max rel. diff vs float32 loop",
                 "max rel. diff vs float64 loop"], rows),
        ]
    fit = res["fit"]
    lines += [
        "",
        f"**fit throughput**: {fit['samples_per_s']:.2f} samples/s ({fit['samples']} samples of {fit['size']} px in "
        f"batches of {fit['batch']}, {fit['time_s']:.1f} s).",
        "",
        "`loop_autograd`: one forward/backward per sample with `torch.autograd.grad` on the model; `batched`: "
        "`ParameterSaliency.profiles` (one batched forward and backward; each layer's per-sample weight gradient is "
        "its unfolded input times its output gradient, reduced to the per-filter mean |.| in cache-sized blocks "
        "inside the backward pass); `ceiling_summed_grads`: one batched forward and backward with the summed "
        "weight gradients, the floor of any per-sample method; `vmap_chunkN`: `strategy=\"vmap\"` with `chunk_size=N` "
        "(`torch.func.vmap(grad)`, grouped convolutions). Differences are layer-relative (per sample and "
        "parameter, `max |p - ref| / max |ref|`). The float32 loop's own distance from float64 is float32 "
        "conditioning of batch-1 passes (a ReLU input within rounding of zero switches the gradient's path), "
        "not an error of any method; see docs/parameter_saliency.md.",
        "",
        f"Command: `{part['command']}`",
    ]
    return lines


def _table(rows: List[Dict[str, Any]], digits: int = 3) -> str:
    cols = list(rows[0])
    return _timing.markdown_table(
        cols, [[f"{r[c]:.{digits}f}" if isinstance(r[c], float) else r[c] for c in cols] for r in rows]
    )


def validation_markdown(part: Dict[str, Any]) -> List[str]:
    res, env = part["results"], part["environment"]
    head = f"{env['device']}, torch {env['torch']}, {env['date_utc']}."
    if "depth_bias" not in res:
        return [f"Skipped: {res.get('skipped', 'no results')}. {head}", "", f"Command: `{part['command']}`"]
    ft = res["fine_tune"]
    return [
        f"Benchmark `ShapesResNet` ({res['weights']} weights, {res['num_filters']} filters); statistics and POT "
        f"fitted on {res['reference_samples']} validation images (fit: {res['fit_samples_per_s']:.1f} samples/s; "
        f"{res['pot_fitted_filters']} filters with a GPD fit); {res['misclassified']} of {res['test_samples']} test "
        f"images misclassified, all explained. {head}",
        "",
        f"**Layer-depth bias**: share of the top-{part['settings']['k']} filters of the misclassified images per "
        "stage (`share_of_filters`: what an unbiased ranking would give)",
        "",
        _table(res["depth_bias"]),
        "",
        "**Turning filters off** (standardised ranking; drop of the wrong class's probability, rise of the true "
        "class's probability, fraction corrected; random: mean of "
        f"{part['settings']['n_random']} draws)",
        "",
        _table(res["turn_off"]["standardized"]),
        "",
        "**Turning filters off, POT ranking**",
        "",
        _table(res["turn_off"]["pot"]),
        "",
        f"**One SGD step** (lr {ft['lr']:g}) on the top-{ft['k']} filters of each misclassified image; effect on "
        f"the image, its {ft['n_neighbors']} nearest misclassified neighbours in saliency space, and "
        f"{ft['n_neighbors']} random misclassified images",
        "",
        _table(ft["table"]),
        "",
        f"Command: `{part['command']}`",
    ]


def to_markdown(payload: Dict[str, Any]) -> str:
    lines = ["### Parameter-space saliency: profiles from one batched pass", ""]
    parts = payload["parts"]
    if "speed" in parts:
        lines += speed_markdown(parts["speed"])
    else:
        lines += ["(speed part not run)"]
    lines += ["", "### Parameter-space saliency: validation on the benchmark model", ""]
    if "validation" in parts:
        lines += validation_markdown(parts["validation"])
    else:
        lines += ["(validation part not run)"]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (CI smoke test, a few seconds)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--parts", nargs="+", default=["speed", "validation"], choices=["speed", "validation"],
                   help="what to run (default: both; --quick: speed only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--model", default="resnet18", help="torchvision model name")
    p.add_argument("--samples", type=int, default=None, help="samples profiled (default 32)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in pixels (default 64 112)")
    p.add_argument("--chunk", type=int, default=None, help="chunk size of the vmap variant (default 8)")
    p.add_argument("--no-vmap", action="store_true", help="do not time the vmap engine")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before")
    p.add_argument("--fit-batch", type=int, default=None)
    p.add_argument("--fit-batches", type=int, default=None)
    p.add_argument("--val-size", type=int, default=500, help="validation: reference images (default 500)")
    p.add_argument("--test-size", type=int, default=500, help="validation: test images (default 500)")
    p.add_argument("--k", type=int, default=10, help="validation: top-k filters (default 10)")
    p.add_argument("--n-random", type=int, default=10, help="validation: random draws (default 10)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="validation without committed weights: use a random initialisation (development only)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    if quick and "--parts" not in list(argv if argv is not None else sys.argv[1:]):
        args.parts = ["speed"]
    args.samples = args.samples or (2 if quick else 32)
    args.sizes = args.sizes or ([32] if quick else [64, 112])
    args.chunk = args.chunk or (1 if quick else 8)
    args.repeats = args.repeats or (1 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    args.fit_batch = args.fit_batch or (2 if quick else 16)
    args.fit_batches = args.fit_batches or (1 if quick else 4)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


_SPEED_KEYS = ("device", "threads", "model", "samples", "sizes", "chunk", "no_vmap", "repeats", "warmup", "fit_batch",
               "fit_batches")
_VALIDATION_KEYS = ("chunk", "val_size", "test_size", "k", "n_random", "allow_random_weights")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import json

    args = parse_args(argv)
    out_dir = Path(args.out) if args.out is not None else _timing.DEFAULT_RESULTS
    previous: Dict[str, Any] = {}
    old = out_dir / f"{STEM}.json"
    if old.is_file():
        try:
            data = json.loads(old.read_text())
            previous = data.get("parts", {})
            if not previous and "profiles" in data.get("results", {}):  # single-part format of earlier runs
                previous = {"speed": {k: data[k] for k in ("command", "environment", "settings", "results", "targets")}}
        except (ValueError, AttributeError):
            previous = {}
    parts: Dict[str, Any] = {k: v for k, v in previous.items() if k not in args.parts}
    command = _timing.command_line(__file__, argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if "speed" in args.parts:
            env = _timing.environment(args.device)
            results = run(args)
            parts["speed"] = {
                "command": command,
                "environment": env,
                "settings": {k: getattr(args, k) for k in _SPEED_KEYS},
                "results": results,
                "targets": targets(results),
            }
        if "validation" in args.parts:
            env = _timing.environment("cpu")
            parts["validation"] = {
                "command": command,
                "environment": env,
                "settings": {k: getattr(args, k) for k in _VALIDATION_KEYS},
                "results": run_validation(args),
            }
    finally:
        torch.set_num_threads(threads)
    payload = {
        "benchmark": STEM,
        "command": command,  # read by make_report.py
        "parts": {k: parts[k] for k in ("speed", "validation") if k in parts},
    }
    return _timing.emit(STEM, args.out, payload, to_markdown(payload))


if __name__ == "__main__":
    raise SystemExit(main())
