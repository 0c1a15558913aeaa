"""Assemble ``docs/benchmarks.md`` from the benchmark results (``benchmarks/results/*.md``).

Every benchmark script writes a Markdown fragment (tables + the exact command that produced them)
and a JSON file to ``benchmarks/results``. This script concatenates *all* fragments in a fixed
order (models, paper claims, the other quality benchmarks alphabetically, then speed and memory),
copies the figures they link to into ``docs/img/`` (links are rewritten), and adds a summary and a
closing note on the paper's claims from ``bench_claims.json``. It computes nothing itself.

Regenerate the page after running the benchmarks::

    python benchmarks/make_report.py

CI smoke test (reads the committed results, writes elsewhere)::

    python benchmarks/make_report.py --quick --out /tmp/report
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

FIRST = ("train_models", "bench_claims")  # the ground-truth benchmark, then the paper's claims
LAST_WORDS = ("speed", "timing", "memory", "order0", "order1", "runner", "peers")  # performance fragments go last
IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")

CLAIMS = {
    1: "Grad-CAM gives useful maps only near the end of the network; NormGrad works at every depth",
    2: "Order 0 is not class-selective: it highlights both objects",
    3: "Order 1 (training) highlights the target object at every depth",
    4: "The adversarial order-1 map highlights the other object",
    5: "On images with a single object, order 0 and order 1 are similar",
}


def order_fragments(stems: List[str]) -> List[str]:
    """Fixed order: FIRST, then quality benchmarks alphabetically, then performance benchmarks."""
    first = [s for f in FIRST for s in sorted(stems) if s == f or s.startswith(f + "_")]
    rest = [s for s in sorted(stems) if s not in first]
    perf = [s for s in rest if any(w in s for w in LAST_WORDS)]
    return first + [s for s in rest if s not in perf] + perf


def copy_figures(text: str, results: Path, img_dir: Path, img_prefix: str) -> str:
    """Copy the local images a fragment links to and point the links at the copies."""

    def repl(m: "re.Match[str]") -> str:
        target = m.group(2)
        if "://" in target or target.startswith("/"):
            return m.group(0)
        src = (results / target).resolve()
        if not src.is_file():
            return m.group(0) + " *(figure missing: rerun the benchmark)*"
        img_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, img_dir / src.name)
        return f"{m.group(1)}{img_prefix}{src.name}{m.group(3)}"

    return IMAGE_LINK.sub(repl, text)


def normalise_headings(text: str, top: int = 2) -> str:
    """Shift a fragment's Markdown headings so that its highest level becomes ``top`` (code fences untouched)."""
    lines = text.splitlines()
    fenced = False
    levels = []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            levels.append(len(line) - len(line.lstrip("#")))
    if not levels:
        return text
    shift = top - min(levels)
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            level = len(line) - len(line.lstrip("#"))
            line = "#" * max(1, min(6, level + shift)) + line[level:]
        out.append(line)
    return "\n".join(out)


def command_of(results: Path, stem: str) -> str:
    """The exact command recorded in ``<stem>.json`` (key ``command``), else the plain invocation."""
    path = results / f"{stem}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("command"), str):
        return data["command"]
    return f"python benchmarks/{stem}.py"


def claims_summary(results: Path) -> Optional[List[str]]:
    path = results / "bench_claims.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    by_claim: Dict[int, List[dict]] = {}
    for v in data.get("verdicts", []):
        by_claim.setdefault(int(v["claim"]), []).append(v)
    lines = []
    for c, text in CLAIMS.items():
        vs = by_claim.get(c, [])
        if not vs:
            lines.append(f"{c}. {text}: *not measured in the last run*.")
            continue
        parts = "; ".join(f"{v['model']}: **{v['verdict']}** ({v['numbers']})" for v in vs)
        lines.append(f"{c}. {text}: {parts}.")
    return lines


def build(results: Path, out: Path) -> Path:
    fragments = {p.stem: p for p in results.glob("*.md")}
    if not fragments:
        raise SystemExit(f"no Markdown fragments in {results}: run the benchmark scripts first")
    img_dir = out / "img"
    lines = [
        "# Benchmarks",
        "",
        "Every number on this page comes from a committed script in `benchmarks/`, run as shown under each "
        "table (each script also has a `--quick` mode that CI runs so the scripts cannot rot). The page is "
        "assembled by `python benchmarks/make_report.py` from the fragments in `benchmarks/results/`.",
        "",
        "Pretrained ImageNet weights cannot be downloaded where these were run, so the paper's claims are "
        "checked on a *ground-truth benchmark*: generated images of six shape x texture classes on cluttered "
        "backgrounds with exact object masks (`captum_normgrad.datasets`), and two small models trained on "
        "them (`captum_normgrad.models`, weights committed). The same scripts accept the real models "
        "(`captum_normgrad.models.torchvision_model`) for users who have them.",
        "",
        "The benchmark in a few lines (the pointing game of NormGrad at every block of the benchmark VGG):",
        "",
        "```python",
        "from captum_normgrad import LayerNormGrad",
        "from captum_normgrad.datasets import ShapesDataset",
        "from captum_normgrad.evaluation import pointing_game",
        "from captum_normgrad.models import benchmark_layers, load_benchmark_model",
        "",
        "images, labels, masks = ShapesDataset(24, split=\"test\").tensors()",
        "model = load_benchmark_model(\"vgg\")                 # committed weights, eval mode",
        "blocks = benchmark_layers(model)                    # {\"block1\": model.features[5], ...}",
        "maps = LayerNormGrad(model, list(blocks.values())).attribute(images, target=labels)",
        "for name, m in zip(blocks, maps):",
        "    print(name, pointing_game(m, masks, labels, tolerance=2).accuracy)",
        "```",
        "",
    ]
    summary = claims_summary(results)
    if summary:
        lines += ["## Summary: the NormGrad paper's claims", ""] + summary + [""]
    lines += ["## Contents", ""]
    order = order_fragments(list(fragments))
    for stem in order:
        lines.append(f"- `{stem}` (`benchmarks/{stem}.py`)" if (ROOT / "benchmarks" / f"{stem}.py").is_file() else f"- `{stem}`")
    lines.append("")
    for stem in order:
        text = fragments[stem].read_text().strip()
        lines += [normalise_headings(copy_figures(text, results, img_dir, "img/")), ""]
    if summary:
        lines += [
            "## Closing note",
            "",
            "Which of the paper's Figure-1 claims this benchmark reproduces, with the numbers "
            "(block1/.../block4; criteria in the claims section, fixed before the first run):",
            "",
        ] + summary + [""]
    lines += ["To regenerate this page (the commands recorded by the last full runs):", "", "```bash"]
    lines += [command_of(results, s) for s in order if (ROOT / "benchmarks" / f"{s}.py").is_file()]
    lines += ["python benchmarks/make_report.py", "```", ""]
    out.mkdir(parents=True, exist_ok=True)
    page = out / "benchmarks.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the fragments")
    p.add_argument("--out", default=str(ROOT / "docs"), help="writes <out>/benchmarks.md and <out>/img/")
    p.add_argument("--quick", action="store_true", help="same work (it is cheap); for the CI smoke test")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    page = build(Path(args.results), Path(args.out))
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
