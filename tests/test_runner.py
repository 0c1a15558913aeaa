"""The dataset-scale runner: sharding, resumption, atomicity, distributed equality, bad inputs.

References are independent: maps from a plain forward/backward with ``torch.autograd.grad`` on
the split ``nn.Sequential``, statistics from a per-sample gradient loop and numpy, shard
ownership from the definition ``k % world``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import captum_normgrad.runner.storage as storage
from captum_normgrad.runner import (
    OutputDirError,
    RunConfig,
    RunOutput,
    ShardWriteError,
    WelfordState,
    all_reduce_welford,
    load_config,
    merge_states,
    run,
    shard_ranges,
    shards_of_rank,
)
from captum_normgrad.runner.storage import shard_is_complete, shard_paths

HERE = Path(__file__).resolve().parent
HELPERS = HERE / "runner_helpers.py"
sys.path.insert(0, str(HERE))
import runner_helpers  # noqa: E402

PY = sys.executable
TORCHRUN = runner_helpers.TORCHRUN


def _config(tmp: Path, name: str = "cfg", **over: Any) -> Path:
    cfg: Dict[str, Any] = {
        "output": "out",
        "batch_size": 3,
        "shard_size": 4,
        "layers": ["0", "2"],
        "methods": ["normgrad", {"method": "normgrad_selective", "name": "sel", "layers": ["2"]}],
        "threads": 1,
        "progress": False,
        "dataset": {"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 18}},
        "model": {"source": "factory", "factory": f"{HELPERS}:tiny_cnn"},
        "statistics": {"parameter_saliency": True},
    }
    cfg.update(over)
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


# ----------------------------------------------------------------------------- references


def _direct_normgrad(model: torch.nn.Sequential, x: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """||a_u|| * ||g_u|| at the output of model[k], by splitting the Sequential there."""
    a = model[: k + 1](x).detach().requires_grad_(True)
    out = model[k + 1 :](a)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), a)
    return (a.detach().norm(dim=1) * g.norm(dim=1)).unsqueeze(1)


def _direct_profiles(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    convs = [p for p in model.parameters() if p.dim() == 4]
    rows = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, convs)
        rows.append(torch.cat([g.abs().flatten(1).mean(1) for g in gs]).double().numpy())
    return np.stack(rows)


def _check_complete_output(out: Path, n: int) -> RunOutput:
    res = RunOutput(out)
    ids = [s.index for s in res.samples] + [f["index"] for f in res.failed]
    assert sorted(ids) == list(range(n)), "every sample exactly once"
    assert res.complete_shards() == list(range(res.run["num_shards"]))
    leftovers = list(out.rglob("*.tmp"))
    assert leftovers == [], f"temporary files left: {leftovers}"
    return res


# ----------------------------------------------------------------------------- Welford


@given(
    n=st.integers(2, 40),
    f=st.integers(1, 4),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_welford_merge_equals_numpy(n: int, f: int, cuts: List[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(3.0, 2.0, size=(n, f)) * rng.uniform(0.1, 10, size=f)
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    parts = [WelfordState(f).update(torch.from_numpy(values[a:b])) for a, b in zip(bounds, bounds[1:])]
    merged = merge_states(parts)
    assert merged.count == n
    np.testing.assert_allclose(merged.mean.numpy(), values.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.variance().numpy(), values.var(0, ddof=1), rtol=1e-10, atol=1e-12)
    # merging in the reverse order gives the same statistics up to rounding
    rev = merge_states(parts[::-1])
    np.testing.assert_allclose(rev.m2.numpy(), merged.m2.numpy(), rtol=1e-10, atol=1e-12)


def test_merge_states_and_all_reduce_without_process_group() -> None:
    s = WelfordState(2).update(torch.tensor([[1.0, 2.0], [1.0, 4.0], [1.0, 6.0]], dtype=torch.float64))
    assert s.std().tolist() == [1.0, 2.0]  # constant feature: sigma <= 1e-14 -> 1
    with pytest.raises(ValueError, match="different models"):
        merge_states([s, WelfordState(3)])
    with pytest.raises(ValueError, match="at least one state"):
        merge_states([])
    assert merge_states([], num_features=2).count == 0
    alone = all_reduce_welford(s)  # one process: a copy
    assert alone is not s and alone.count == 3 and torch.equal(alone.m2, s.m2)
    with pytest.raises(TypeError, match="WelfordState"):
        all_reduce_welford("state")


@given(n=st.integers(1, 60), size=st.integers(1, 9), world=st.integers(1, 5))
def test_shards_disjoint_and_covering(n: int, size: int, world: int) -> None:
    ranges = shard_ranges(n, size)
    owned = [shards_of_rank(len(ranges), r, world) for r in range(world)]
    flat = sorted(s for o in owned for s in o)
    assert flat == list(range(len(ranges)))  # each shard on exactly one rank
    for r, o in enumerate(owned):
        assert all(s % world == r for s in o)
    assert [i for rg in ranges for i in rg] == list(range(n))
    assert all(len(rg) == size for rg in ranges[:-1])


# ----------------------------------------------------------------------------- single process


def test_single_process_matches_direct_computation(tmp_path: Path) -> None:
    report = run(load_config(_config(tmp_path)))
    assert report.num_samples == 18 and report.samples_written == 18 and report.shards_total == 5
    assert report.samples_per_s > 0 and report.failed == []
    res = _check_complete_output(tmp_path / "out", 18)
    ds, model = runner_helpers.TinyDataset(18), runner_helpers.tiny_cnn()
    y = ds.y
    with torch.no_grad():
        pred = model(ds.x).argmax(1)
    assert [s.target for s in res.samples] == y.tolist()
    assert [s.prediction for s in res.samples] == pred.tolist()
    assert [s.id for s in res.samples] == [f"img{i:04d}" for i in range(18)]
    for key, k in (("normgrad/0", 0), ("normgrad/2", 2)):
        idx, maps = res.maps(key)
        assert idx.tolist() == list(range(18))
        torch.testing.assert_close(maps, _direct_normgrad(model, ds.x, y, k), rtol=1e-5, atol=1e-6)
    assert "maps/sel/2" in res.keys() and "maps/sel/0" not in res.keys()
    stats = res.statistics()
    prof = _direct_profiles(model, ds.x, y)
    assert stats.count == 18
    from captum_normgrad.parameter_saliency import ParameterSaliency

    ps = ParameterSaliency(model).load(res.statistics_path)  # the library's own format
    assert ps.is_fitted and torch.equal(ps.statistics.mean, stats.mean)
    np.testing.assert_allclose(stats.mean.numpy(), prof.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(stats.variance().numpy(), prof.var(0, ddof=1), rtol=1e-4, atol=1e-12)
    # a second run is a no-op resume: everything skipped, output unchanged
    again = run(load_config(_config(tmp_path)))
    assert again.shards_skipped == 5 and again.shards_computed == 0 and again.samples_computed == 0
    # the caller's model is never written into when passed as an object
    user = runner_helpers.tiny_cnn().train()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    run(load_config(_config(tmp_path, output="out_obj")), model=user)
    assert user.training and all(torch.equal(before[k], v) for k, v in user.state_dict().items())
    assert all(p.grad is None for p in user.parameters())
    torch.testing.assert_close(RunOutput(tmp_path / "out_obj").maps("normgrad/2")[1], res.maps("normgrad/2")[1])


# ----------------------------------------------------------------------------- torchrun


def test_torchrun_two_ranks_identical_to_single_process(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    result = tmp_path / "result"
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--standalone", str(HELPERS), str(cfg), str(tmp_path / "out2"), str(result)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # torchrun and its workers: our own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    single = run(load_config(cfg, overrides={"output": str(tmp_path / "out1")}))
    r2 = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in (0, 1)]
    rep = r2[0]["report"]
    assert rep["world_size"] == 2 and rep["samples_written"] == 18 and rep == r2[1]["report"]
    assert {p["rank"]: p["shards_computed"] for p in rep["per_rank"]} == {0: 3, 1: 2}
    a, b = RunOutput(tmp_path / "out1"), _check_complete_output(tmp_path / "out2", 18)
    for s in range(5):  # disjoint ownership: shard k written by rank k % 2
        assert storage.read_marker(tmp_path / "out2", s)["rank"] == s % 2
    assert a.keys() == b.keys() and len(a.keys()) == 3
    for key in a.keys():
        ia, ma = a.maps(key)
        ib, mb = b.maps(key)
        assert torch.equal(ia, ib) and torch.equal(ma, mb), key  # bit-identical
    assert [vars(s) for s in a.samples] == [vars(s) for s in b.samples]
    sa, sb = a.statistics(), b.statistics()
    assert sa.count == sb.count == 18
    assert torch.equal(sa.mean, sb.mean) and torch.equal(sa.m2, sb.m2)  # bit-identical statistics
    assert a.config_hash == b.config_hash == single.config_hash
    # the generic all-reduce of per-rank Welford states equals the single-process statistics
    values = (torch.arange(0, 35, dtype=torch.float64).reshape(7, 5).sin() * 3 + 1).numpy()
    for r in r2:
        w = r["welford"]
        assert w["count"] == 7 and w == r2[0]["welford"]
        np.testing.assert_allclose(w["mean"], values.mean(0), rtol=1e-13)
        np.testing.assert_allclose(np.array(w["m2"]) / 6, values.var(0, ddof=1), rtol=1e-12)


# ----------------------------------------------------------------------------- kill and resume


def test_sigkill_during_run_then_resume(tmp_path: Path) -> None:
    n = 24
    cfg = _config(
        tmp_path,
        shard_size=2,
        batch_size=2,
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": n}},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"sleep": 0.05}},
        statistics={"parameter_saliency": False},  # statistics across a resume: test_torn_and_stale_...
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [PY, "-m", "captum_normgrad.runner", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 3:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists()
    h = json.loads((out / "run.json").read_text())["config_hash"]
    complete = [s for s in range(12) if shard_is_complete(out, s, h) is not None]
    assert 3 <= len(complete) < 12, complete
    # a shard file without its marker (torn or not) is never taken as complete
    for s in range(12):
        data, marker = shard_paths(out, s)
        if not marker.exists():
            assert s not in complete
    report = run(load_config(cfg))
    assert report.shards_skipped == len(complete) and report.shards_computed == 12 - len(complete)
    res = _check_complete_output(out, n)
    assert len(res.samples) == n and len({s.index for s in res.samples}) == n
    ds, model = runner_helpers.TinyDataset(n), runner_helpers.tiny_cnn()
    _, maps = res.maps("normgrad/2")
    torch.testing.assert_close(maps, _direct_normgrad(model, ds.x, ds.y, 2), rtol=1e-5, atol=1e-6)


_children_with_rank = runner_helpers.children_with_rank


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find torchrun's workers")
def test_sigkill_one_torchrun_rank_then_resume_with_one_process(tmp_path: Path) -> None:
    n = 24
    cfg = _config(
        tmp_path,
        shard_size=2,
        batch_size=2,
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": n}},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"sleep": 0.05}},
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "captum_normgrad.cli", "run", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 150
        while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 3:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        workers = _children_with_rank(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)  # kill -9 of one rank: torchrun stops the other and fails
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert not (out / "index.json").exists()
    h = json.loads((out / "run.json").read_text())["config_hash"]
    complete = [s for s in range(12) if shard_is_complete(out, s, h) is not None]
    assert 3 <= len(complete) < 12, complete
    # resume with another world size (1 process): the shards do not depend on it
    report = run(load_config(cfg))
    assert report.world_size == 1 and report.shards_skipped == len(complete)
    assert report.shards_computed == 12 - len(complete)
    res = _check_complete_output(out, n)
    assert sorted(s.index for s in res.samples) == list(range(n))
    ds, model = runner_helpers.TinyDataset(n), runner_helpers.tiny_cnn()
    torch.testing.assert_close(res.maps("normgrad/0")[1], _direct_normgrad(model, ds.x, ds.y, 0), rtol=1e-5, atol=1e-6)
    prof = _direct_profiles(model, ds.x, ds.y)
    stats = res.statistics()
    assert stats.count == n
    np.testing.assert_allclose(stats.mean.numpy(), prof.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(stats.variance().numpy(), prof.var(0, ddof=1), rtol=1e-4, atol=1e-12)


def test_every_builtin_method_runs(tmp_path: Path) -> None:
    from captum.attr import LayerGradCam

    from captum_normgrad.runner import BUILTIN_METHODS

    cfg = _config(
        tmp_path, layers=["2"], methods=list(BUILTIN_METHODS), statistics={"parameter_saliency": False},
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 4}},
    )
    run(load_config(cfg))
    res = RunOutput(tmp_path / "out")
    assert res.keys() == sorted(f"maps/{m}/2" for m in BUILTIN_METHODS)
    ds, model = runner_helpers.TinyDataset(4), runner_helpers.tiny_cnn()
    for m in BUILTIN_METHODS:
        maps = res.maps(f"{m}/2")[1]
        assert maps.shape[0] == 4 and maps.shape[-2:] == (12, 12) and torch.isfinite(maps).all()
    ref = LayerGradCam(model, model[2]).attribute(ds.x, target=ds.y)
    torch.testing.assert_close(res.maps("gradcam/2")[1], ref.detach())
    torch.testing.assert_close(res.maps("normgrad/2")[1], _direct_normgrad(model, ds.x, ds.y, 2), rtol=1e-5, atol=1e-6)


def test_torn_and_stale_files_are_recomputed(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    run(load_config(cfg))
    out = tmp_path / "out"
    ref = RunOutput(out).maps("normgrad/0")[1]
    d1, _ = shard_paths(out, 1)
    d1.write_bytes(d1.read_bytes()[: d1.stat().st_size // 2])  # torn shard file, marker intact
    shard_paths(out, 2)[1].unlink()  # complete file, missing marker
    d3 = shard_paths(out, 3)[0]
    before3 = {k: v.clone() for k, v in load_file(str(d3)).items()}
    d3.write_bytes(d3.read_bytes()[:-1] + bytes([d3.read_bytes()[-1] ^ 1]))  # same size, flipped bit
    (out / "shards" / ".shard-00004.safetensors.abc.tmp").write_bytes(b"partial")
    (out / "index.json").unlink()
    report = run(load_config(cfg))
    assert report.shards_computed == 3 and report.shards_skipped == 2
    res = _check_complete_output(out, 18)
    assert torch.equal(res.maps("normgrad/0")[1], ref)
    after3 = load_file(str(d3))
    assert before3.keys() == after3.keys() and all(torch.equal(before3[k], after3[k]) for k in before3)
    # statistics merge recomputed shards with the states stored in the skipped ones
    ds, model = runner_helpers.TinyDataset(18), runner_helpers.tiny_cnn()
    prof = _direct_profiles(model, ds.x, ds.y)
    stats = res.statistics()
    assert stats.count == 18
    np.testing.assert_allclose(stats.mean.numpy(), prof.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(stats.variance().numpy(), prof.var(0, ddof=1), rtol=1e-4, atol=1e-12)


# ----------------------------------------------------------------------------- bad inputs


def test_unreadable_images_are_reported_and_skipped(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "1.png").write_bytes(b"not a png at all")
    (tmp_path / "imgs" / "cat" / "9.jpg").write_bytes(b"\xff\xd8\xff truncated")
    cfg = _config(
        tmp_path,
        dataset={"kind": "folder", "root": "imgs", "image_size": 12},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"classes": 2}},
    )
    report = run(load_config(cfg))
    assert sorted(f["id"] for f in report.failed) == ["cat/9.jpg", "dog/1.png"]
    assert all(f["error"] for f in report.failed)
    assert "unreadable samples skipped (2)" in str(report) and "dog/1.png" in str(report)
    res = _check_complete_output(tmp_path / "out", 7)
    assert len(res.samples) == 5 and sorted(f["id"] for f in res.failed) == ["cat/9.jpg", "dog/1.png"]
    assert {s.id: s.target for s in res.samples} == {"cat/0.png": 0, "cat/1.png": 0, "cat/2.png": 0,
                                                      "dog/0.png": 1, "dog/2.png": 1}
    # the list survives a resume (read back from the completion markers)
    assert [f["id"] for f in run(load_config(cfg)).failed] == [f["id"] for f in report.failed]


def test_shard_of_only_unreadable_samples(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, statistics={"parameter_saliency": False},
        dataset={"kind": "factory", "factory": f"{HELPERS}:FlakyDataset", "kwargs": {"n": 10, "bad": [4, 5, 6, 7, 9]}},
    )
    report = run(load_config(cfg))
    assert [f["index"] for f in report.failed] == [4, 5, 6, 7, 9]
    assert all("cannot read sample" in f["error"] for f in report.failed)
    res = _check_complete_output(tmp_path / "out", 10)
    idx, maps = res.maps("normgrad/2")
    assert idx.tolist() == [0, 1, 2, 3, 8] and maps.shape[0] == 5
    ds, model = runner_helpers.TinyDataset(10), runner_helpers.tiny_cnn()
    keep = idx
    torch.testing.assert_close(maps, _direct_normgrad(model, ds.x[keep], ds.y[keep], 2), rtol=1e-5, atol=1e-6)


def test_output_dir_of_another_configuration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(load_config(_config(tmp_path, statistics={"parameter_saliency": False})))
    cfg2 = _config(tmp_path, "cfg2", layers=["2"], statistics={"parameter_saliency": False})
    with pytest.raises(OutputDirError, match=r"different configuration.*differing: config\.layers.*another output"):
        run(load_config(cfg2))
    # runtime options are not part of the configuration: resuming with other ones is accepted
    ok = run(load_config(_config(tmp_path, "cfg3", statistics={"parameter_saliency": False}, num_workers=1, threads=2)))
    assert ok.shards_skipped == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty and is not a runner output"):
        run(load_config(_config(tmp_path, "cfg4", output="foreign")))
    from captum_normgrad.cli import main

    assert main(["run", str(cfg2), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different configuration" in err and "Traceback" not in err


def test_write_error_fails_loudly_without_marking_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    real = storage.atomic_write_bytes

    def failing(path: Path, data: bytes) -> None:
        if Path(path).name in ("shard-00001.safetensors", "shard-00003.done.json"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", failing)
    with pytest.raises(ShardWriteError, match=r"shard 1 .*No space left.*NOT marked complete.*rerun"):
        run(load_config(cfg))
    h = json.loads((out / "run.json").read_text())["config_hash"]
    assert shard_is_complete(out, 0, h) is not None
    assert not shard_paths(out, 1)[0].exists() and not shard_paths(out, 1)[1].exists()
    assert list(out.rglob("*.tmp")) == []
    # the marker write failing: the (complete) data file is there, but no marker -> not complete
    monkeypatch.setattr(storage, "atomic_write_bytes", lambda p, d: failing(p, d) if "00001" not in Path(p).name else real(p, d))
    with pytest.raises(ShardWriteError, match="shard 3"):
        run(load_config(cfg))
    assert shard_paths(out, 3)[0].exists() and not shard_paths(out, 3)[1].exists()
    assert shard_is_complete(out, 3, h) is None
    monkeypatch.setattr(storage, "atomic_write_bytes", real)
    report = run(load_config(cfg))
    assert report.shards_computed == 2 and report.shards_skipped == 3  # shards 3 and 4
    _check_complete_output(out, 18)


def test_write_error_in_read_only_dir(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the monkeypatched writer test covers this path")
    cfg = _config(tmp_path, statistics={"parameter_saliency": False})
    run(load_config(cfg))
    out = tmp_path / "out"
    shard_paths(out, 4)[1].unlink()  # shard 4 to be recomputed into a read-only folder
    (out / "shards").chmod(0o500)
    try:
        with pytest.raises(ShardWriteError, match="shard 4 .*NOT marked complete"):
            run(load_config(cfg))
    finally:
        (out / "shards").chmod(0o700)
    assert not shard_paths(out, 4)[1].exists()
    assert run(load_config(cfg)).shards_computed == 1


def test_configuration_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown key.*'batchsize'.*allowed keys"):
        load_config(_config(tmp_path, batchsize=3))
    with pytest.raises(ValueError, match="unknown method 'normgard'"):
        run(load_config(_config(tmp_path, methods=["normgard"])))
    with pytest.raises(ValueError, match="unknown layer '3x'.*valid names"):
        run(load_config(_config(tmp_path, layers=["3x"])))
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        load_config(_config(tmp_path, shard_size=0))
    with pytest.raises(ValueError, match="target must be"):
        load_config(_config(tmp_path, target="best"))
    with pytest.raises(ValueError, match="has no layers"):
        load_config(_config(tmp_path, layers=[]))
    toml = tmp_path / "c.toml"
    toml.write_text('output = "o"\nlayers = ["0"]\n[dataset]\nkind = "folder"\n')
    with pytest.raises(ValueError, match="needs root"):
        load_config(toml)
    toml.write_text('output = "o"\nlayers = ["2"]\ntarget = "prediction"\n[model]\nsource = "factory"\n'
                    f'factory = "{HELPERS}:tiny_cnn"\n[dataset]\nkind = "factory"\nfactory = "{HELPERS}:TinyDataset"\n')
    cfg = load_config(toml)
    assert isinstance(cfg, RunConfig) and cfg.output_dir == tmp_path / "o" and cfg.methods[0].method == "normgrad"
    (tmp_path / "c.yaml").write_text("x: 1")
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        load_config(tmp_path / "c.yaml")
