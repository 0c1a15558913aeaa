"""Train the two benchmark models (ShapesVGG, ShapesResNet) on the generated shapes.

Seeded end to end: the images come from ``ShapesDataset(split="train")`` / ``split="test"``,
initialisation, shuffling and augmentation from ``--seed``. Writes

- the weights, float16 safetensors with the architecture in the metadata, to
  ``captum_normgrad/assets/shapes_<model>.safetensors`` (``--weights-dir``);
- ``<out>/train_models.json`` and ``<out>/train_models.md`` (table + the exact command).

The reported accuracy is measured on the float16-rounded weights that are committed, i.e. on
exactly what ``load_benchmark_model`` returns.

Full run (what produced the committed weights)::

    python benchmarks/train_models.py --threads 2

CI smoke test (tiny, writes everything, weights included, under --out)::

    python benchmarks/train_models.py --quick --out /tmp/train_quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from tqdm import tqdm

from captum_normgrad.datasets import CLASS_NAMES, NUM_CLASSES, SPLIT_SEEDS, ShapesDataset, TwoObjectShapesDataset
from captum_normgrad.models import BENCHMARK_MODELS, build_benchmark_model, load_benchmark_model, weights_path

ROOT = Path(__file__).resolve().parents[1]

# Architecture widths used for the committed weights (stored in the weights' metadata too).
WIDTHS = {"vgg": (12, 24, 48, 96), "resnet": (16, 32, 64, 128)}


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(BENCHMARK_MODELS), choices=BENCHMARK_MODELS)
    p.add_argument("--train-size", type=int, default=5000, help="training images (default 5000)")
    p.add_argument("--test-size", type=int, default=1000, help="single-object test images (default 1000)")
    p.add_argument("--pair-size", type=int, default=300, help="two-object test images (default 300)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    p.add_argument("--weights-dir", default=None, help="where to write weights (default: package assets; --quick: --out)")
    p.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests (seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.pair_size, args.epochs = 128, 64, 16, 1
    if args.weights_dir is None:
        args.weights_dir = args.out if args.quick else str(weights_path("vgg").parent)
    for name in ("train_size", "test_size", "pair_size", "epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, object]:
    model.eval()
    pred = torch.cat([model(x).argmax(1) for x in images.split(256)])
    per_class = [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan") for c in range(NUM_CLASSES)]
    return {"accuracy": float((pred == labels).float().mean()), "per_class_accuracy": dict(zip(CLASS_NAMES, per_class))}


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of two-object images whose two top-scoring classes are exactly the two objects."""
    model.eval()
    top2 = torch.cat([model(x).topk(2, dim=1).indices for x in images.split(256)])
    return float((top2.sort(1).values == labels.sort(1).values).all(1).float().mean())


def train_one(name: str, args: argparse.Namespace, data: Dict[str, torch.Tensor], progress: bool) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_benchmark_model(name, widths=WIDTHS[name])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = data["x_train"].shape[0]
    steps_per_epoch = max(1, n // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    wall0, cpu0 = time.perf_counter(), time.process_time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{args.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x, y = data["x_train"][idx], data["y_train"][idx]
            if torch.rand((), generator=gen) < 0.5:  # classes are mirror-invariant
                x = x.flip(3)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total / steps_per_epoch})
        tqdm.write(f"{name} epoch {epoch + 1}/{args.epochs}: train loss {total / steps_per_epoch:.4f}")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    # save float16 weights with the architecture, then evaluate exactly what was saved
    from safetensors.torch import save_file

    out_dir = Path(args.weights_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / weights_path(name).name
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {
        "arch": name,
        "config": json.dumps(model.config),
        "classes": json.dumps(list(CLASS_NAMES)),
        "trained_by": "benchmarks/train_models.py",
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/train_models.py", *sys.argv[1:]]),
    }
    save_file(state, str(path), metadata=meta)
    loaded = load_benchmark_model(name, weights=path)
    test = evaluate(loaded, data["x_test"], data["y_test"])
    return {
        "model": name,
        "class": type(model).__name__,
        "config": model.config,
        "block_names": model.block_names,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "weights_bytes": path.stat().st_size,
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "history": history,
        "test_accuracy": test["accuracy"],
        "per_class_accuracy": test["per_class_accuracy"],
        "pair_top2_accuracy": evaluate_pairs(loaded, data["x_pair"], data["y_pair"]),
    }


def write_markdown(results: Dict[str, object], path: Path) -> None:
    s = results["settings"]
    lines = [
        "## Benchmark models trained on the generated shapes",
        "",
        f"Training: {s['train_size']} single-object images (`ShapesDataset(split=\"train\")`, seed "
        f"{SPLIT_SEEDS['train']}), {s['epochs']} epochs, AdamW + one-cycle (peak lr {s['lr']}), batch "
        f"{s['batch_size']}, random horizontal flips, seed {s['seed']}, {s['threads']} CPU threads. "
        f"Test: {s['test_size']} fresh single-object images (`split=\"test\"`, seed {SPLIT_SEEDS['test']}); "
        f"two-object top-2: share of {s['pair_size']} two-object test images whose two highest logits are "
        "exactly the two objects' classes. Accuracies are of the committed float16 weights.",
        "",
        "| model | parameters | weights | test accuracy | worst class | two-object top-2 | train time (wall / CPU) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results["models"]:
        worst = min(r["per_class_accuracy"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {r['class']} `{r['model']}` | {r['parameters']:,} | {r['weights_bytes'] / 1024:.0f} KiB "
            f"| **{100 * r['test_accuracy']:.1f}%** | {worst[0]} {100 * worst[1]:.1f}% "
            f"| {100 * r['pair_top2_accuracy']:.1f}% | {r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s |"
        )
    lines += [
        "",
        f"Machine: {results['machine']}. Reproduce with:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_train, y_train, _ = ShapesDataset(args.train_size, split="train").tensors()
    x_test, y_test, _ = ShapesDataset(args.test_size, split="test").tensors()
    x_pair, y_pair, _ = TwoObjectShapesDataset(args.pair_size, split="test").tensors()
    data = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, x_pair=x_pair, y_pair=y_pair)
    gen_s = time.perf_counter() - t0
    models = [train_one(name, args, data, progress) for name in args.models]
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "weights_dir", "no_progress")},
        "data_generation_s": gen_s,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/train_models.py", *argv]),
        "models": models,
    }
    (out / "train_models.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "train_models.md")
    for r in models:
        print(f"{r['model']}: test accuracy {100 * r['test_accuracy']:.1f}%, two-object top-2 "
              f"{100 * r['pair_top2_accuracy']:.1f}%, {r['train_wall_s']:.0f} s -> {r['weights_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
