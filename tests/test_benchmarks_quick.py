"""Smoke test of every benchmark script: ``python benchmarks/<script>.py --quick --out <tmp>``.

Scripts are discovered (every ``benchmarks/*.py`` not starting with ``_`` whose source mentions
``--quick``), so a new benchmark is covered as soon as it exists. Each one runs as a subprocess
with a fresh output folder (the committed results are never touched) and must exit 0 and write
its results: ``<stem>.json`` and ``<stem>.md`` by the benchmarks convention, ``benchmarks.md`` for
the report generator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

SCRIPTS = sorted(
    p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_") and "--quick" in p.read_text(errors="replace")
)
EXPECTED = {"make_report": ["benchmarks.md"]}
TIMEOUT_S = 900  # generous: the scripts share a small CPU in CI


def test_scripts_are_discovered():
    stems = {p.stem for p in SCRIPTS}
    assert {"train_models", "bench_claims", "make_report"} <= stems


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_quick_mode(script: Path, tmp_path: Path):
    out = tmp_path / script.stem
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script.name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for name in EXPECTED.get(script.stem, [f"{script.stem}.json", f"{script.stem}.md"]):
        path = out / name
        assert path.is_file(), f"{script.name} --quick did not write {name}; it wrote {sorted(os.listdir(out)) if out.exists() else 'nothing'}"
        assert path.stat().st_size > 0, f"{name} is empty"


# --------------------------------------------------------------------------- helpers of the scripts


def _load(stem: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{stem}", BENCHMARKS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_claims_selectivity_measures_on_constructed_maps():
    import torch

    claims = _load("bench_claims")
    t = torch.zeros(2, 8, 8, dtype=torch.bool)
    o = torch.zeros(2, 8, 8, dtype=torch.bool)
    t[:, :4, :4] = True
    o[:, 4:, 4:] = True
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, :4, :4] = 3.0  # all energy and the peak on the explained object
    maps[0, 0, 4:, 4:] = -5.0  # negative part is ignored by the energy, not a peak
    maps[1, 0, 4:, 4:] = 1.0  # map 2: energy 16 on the other object, the peak there too
    maps[1, 0, 0, 0] = 1.0 / 3.0  # and 1/3 on the explained object
    s = claims.selectivity_measures(maps, t, o)
    assert abs(s["energy_target"] - (1.0 + (1 / 3) / (1 / 3 + 16)) / 2) < 1e-6
    assert abs(s["energy_other"] - (0.0 + 16 / (1 / 3 + 16)) / 2) < 1e-6
    assert s["peak_target"] == 0.5 and s["peak_other"] == 0.5
    assert claims.is_selective({"energy_target": 0.6, "energy_other": 0.3, "peak_target": 0.8, "peak_other": 0.4})
    assert not claims.is_selective({"energy_target": 0.6, "energy_other": 0.31, "peak_target": 0.9, "peak_other": 0.1})


def test_claims_centre_baseline_by_hand():
    import torch

    claims = _load("bench_claims")
    masks = torch.zeros(3, 9, 9, dtype=torch.bool)
    masks[0, 4, 4] = True  # on the centre pixel: hit
    masks[1, 4, 6] = True  # 2 px away: a miss with tolerance 2 (strictly closer), a hit with 3
    masks[2, 0, 0] = True  # far: miss
    labels = torch.tensor([0, 0, 1])
    assert claims.centre_baseline(masks, labels, 2.0) == (0.5 + 0.0) / 2
    assert claims.centre_baseline(masks, labels, 3.0) == (1.0 + 0.0) / 2


def test_claims_configs_sweep_only_order1_family():
    claims = _load("bench_claims")
    cfgs = claims.configs(["normgrad", "order1", "lookahead"], [1e-3, 1e-2])
    assert cfgs == [("normgrad", None), ("order1", 1e-3), ("order1", 1e-2), ("lookahead", 1e-3), ("lookahead", 1e-2)]
    assert claims.attribute_kwargs("order1_adv", 1e-2)["epsilon"] == 1e-2
    assert claims.attribute_kwargs("order1_adv", 1e-2)["adversarial"] is True


def test_report_order_and_figures(tmp_path):
    report = _load("make_report")
    order = report.order_fragments(["bench_speed", "zeta", "bench_claims", "alpha", "train_models", "bench_order0"])
    assert order[:2] == ["train_models", "bench_claims"]
    assert order.index("alpha") < order.index("zeta") < order.index("bench_order0")
    assert order.index("zeta") < order.index("bench_speed")
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.png").write_bytes(b"\x89PNG fake")
    (results / "a.md").write_text("## A\n\n![plot](a.png) ![gone](b.png) ![web](https://x.org/c.png)\n")
    page = report.build(results, tmp_path / "docs")
    text = page.read_text()
    assert "![plot](img/a.png)" in text and (tmp_path / "docs" / "img" / "a.png").read_bytes() == b"\x89PNG fake"
    assert "figure missing" in text and "![web](https://x.org/c.png)" in text


def test_report_headings_and_commands(tmp_path):
    report = _load("make_report")
    text = "### Top\n\n#### Sub\n\n```bash\n# a shell comment, not a heading\n```\n"
    assert report.normalise_headings(text) == "## Top\n\n### Sub\n\n```bash\n# a shell comment, not a heading\n```"
    (tmp_path / "x.json").write_text('{"command": "python benchmarks/x.py --full"}')
    (tmp_path / "y.json").write_text("[1, 2]")
    assert report.command_of(tmp_path, "x") == "python benchmarks/x.py --full"
    assert report.command_of(tmp_path, "y") == "python benchmarks/y.py"
    assert report.command_of(tmp_path, "missing") == "python benchmarks/missing.py"
