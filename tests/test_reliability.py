"""The reliability suite: bad inputs get a clear error, nothing is silently wrong, nothing is lost.

Runner: resume refuses (or recomputes) when the checkpoint or the images changed, a lock keeps two
runs off one output folder (stale locks taken over), torchrun workers exit when their launcher
dies, a configuration that does not fit the data fails up front, a run where every sample fails is
an error, symlinks in the output folder are never written through, a full disk fails loudly and is
resumable. Maps: NaN/Inf never pass silently through normalisation or fusion.

References are independent: hashes from ``hashlib``, maps from a plain forward/backward, the lock
held by a separate ``fcntl.flock`` process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

from captum_normgrad import fuse_maps, normalize_maps
from captum_normgrad.runner import (
    OutputDirError,
    OutputLockedError,
    RunFailedError,
    RunOutput,
    ShardWriteError,
    load_config,
    run,
)
from captum_normgrad.runner.storage import shard_is_complete

HERE = Path(__file__).resolve().parent
HELPERS = HERE / "runner_helpers.py"
sys.path.insert(0, str(HERE))
import runner_helpers  # noqa: E402

PY = sys.executable
TORCHRUN = runner_helpers.TORCHRUN
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _config(tmp: Path, name: str = "cfg", **over: Any) -> Path:
    cfg: Dict[str, Any] = {
        "output": "out",
        "batch_size": 2,
        "shard_size": 2,
        "layers": ["2"],
        "methods": ["normgrad"],
        "threads": 1,
        "progress": False,
        "dataset": {"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 6}},
        "model": {"source": "factory", "factory": f"{HELPERS}:tiny_cnn"},
    }
    cfg.update(over)
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def _direct_normgrad(model: torch.nn.Sequential, x: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: ||a_u|| * ||g_u|| at the output of model[k], by splitting the Sequential there."""
    a = model[: k + 1](x).detach().requires_grad_(True)
    out = model[k + 1 :](a)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), a)
    return (a.detach().norm(dim=1) * g.norm(dim=1)).unsqueeze(1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``captum-normgrad run ARGS`` in this process (the console script's main: exit code, stdout, stderr).

    The subprocess path (the real console script) is covered by the kill and concurrency tests.
    """
    import contextlib
    import io

    from captum_normgrad.cli import main

    o, e = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(["run", *args, "--no-progress"])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, rc, o.getvalue(), e.getvalue())


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- maps: NaN guards


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_normalize_maps_refuses_non_finite(bad: float) -> None:
    m = torch.rand(3, 1, 4, 4)
    m[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"normalize_maps: maps contain NaN or Inf values \(samples \[1\]\)"):
        normalize_maps(m)


def test_normalize_maps_refuses_bad_options_and_complex() -> None:
    m = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        normalize_maps(m, eps=math.nan)
    with pytest.raises(ValueError, match="constant_value must be a finite number"):
        normalize_maps(m, constant_value=math.nan)
    with pytest.raises(TypeError, match="complex"):
        normalize_maps(torch.rand(2, 4, dtype=torch.complex64))
    # finite maps: still the min-max reference
    ref = (m - m.amin((1, 2, 3), keepdim=True)) / (m.amax((1, 2, 3), keepdim=True) - m.amin((1, 2, 3), keepdim=True))
    torch.testing.assert_close(normalize_maps(m), ref)


def test_fuse_maps_refuses_non_finite_maps_and_weights() -> None:
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8)
    b[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"fuse_maps: map 1 contain NaN or Inf values \(samples \[0\]\)"):
        fuse_maps([a, b])
    b = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="weights must be finite"):
        fuse_maps([a, b], mode="mean", weights=[1.0, math.nan])
    with pytest.raises(ValueError, match="weights must be finite"):
        fuse_maps([a, b], mode="power", weights=[math.inf, 1.0])
    assert bool(torch.isfinite(fuse_maps([a, b])).all())


# ----------------------------------------------------------------------------- resume: inputs changed


def _save_weights(path: Path, seed: int) -> torch.nn.Sequential:
    model = runner_helpers.tiny_cnn()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    torch.save(model.state_dict(), path)
    return model


def test_resume_refuses_a_checkpoint_replaced_under_the_same_name(tmp_path: Path) -> None:
    ckpt = tmp_path / "weights.pt"
    _save_weights(ckpt, 1)
    cfg = _config(tmp_path, model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "checkpoint": "weights.pt"})
    out = tmp_path / "out"
    run(load_config(cfg))
    (out / "shards" / "shard-00002.done.json").unlink()  # a partial run: one shard still to compute
    model_b = _save_weights(tmp_path / "b.pt", 2)
    shutil.copyfile(tmp_path / "b.pt", ckpt)  # weights B copied over the same file
    with pytest.raises(OutputDirError, match=r"model\.checkpoint .*weights\.pt.* changed .*content sha256.*--on-change recompute"):
        run(load_config(cfg))
    r = _cli(str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "model.checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # recompute: every shard, all maps now from weights B (independent reference)
    report = run(load_config(cfg, overrides={"on_change": "recompute"}))
    assert report.shards_computed == 3 and report.shards_skipped == 0
    assert any("model.checkpoint" in c and "every shard recomputed" in c for c in report.changes)
    ds = runner_helpers.TinyDataset(6)
    _, maps = RunOutput(out).maps("normgrad/2")
    torch.testing.assert_close(maps, _direct_normgrad(model_b, ds.x, ds.y, 2), rtol=1e-5, atol=1e-6)
    assert run(load_config(cfg)).shards_skipped == 3  # and the new inputs are recorded


def _write_images(folder: Path, n: int, seed: int, size=(10, 10)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")


def _folder_cfg(tmp: Path, **over: Any) -> Path:
    return _config(
        tmp,
        dataset={"kind": "folder", "root": "imgs", "image_size": 10},
        target="prediction",
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn"},
        **over,
    )


def test_resume_refuses_images_rewritten_under_the_same_names(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 6, 0)
    cfg = _folder_cfg(tmp_path)
    run(load_config(cfg))
    # image 3 rewritten with other pixels: a BMP of the same size has the same byte count,
    # so only the modification time tells
    before = (tmp_path / "imgs" / "3.bmp").stat()
    _write_images(tmp_path / "new", 6, 1)
    shutil.copyfile(tmp_path / "new" / "3.bmp", tmp_path / "imgs" / "3.bmp")
    os.utime(tmp_path / "imgs" / "3.bmp", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (tmp_path / "imgs" / "3.bmp").stat().st_size == before.st_size
    with pytest.raises(OutputDirError, match=r"1 image file\(s\) changed .*'3\.bmp': modified .*same size.*recompute the 1 affected shard"):
        run(load_config(cfg))
    report = run(load_config(cfg, overrides={"on_change": "recompute"}))
    assert report.shards_computed == 1 and report.shards_skipped == 2  # only shard 1 (images 2, 3)
    assert any("3.bmp" in c for c in report.changes)
    # the recomputed maps are those of the new image (reference: direct computation on the files)
    from PIL import Image

    files = sorted((tmp_path / "imgs").glob("*.bmp"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).float() / 255 for f in files])
    model = runner_helpers.tiny_cnn()
    target = model(x).argmax(1)
    _, maps = RunOutput(tmp_path / "out").maps("normgrad/2")
    torch.testing.assert_close(maps, _direct_normgrad(model, x, target, 2), rtol=1e-5, atol=1e-6)


def test_content_fingerprints_ignore_a_touch_but_see_new_bytes(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 4, 0)
    cfg = _folder_cfg(tmp_path, fingerprint="content")
    run(load_config(cfg))
    p = tmp_path / "imgs" / "1.bmp"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 5 * 10**9))  # touched: same bytes
    assert run(load_config(cfg)).shards_skipped == 2
    with pytest.raises(OutputDirError, match="'1.bmp': modified"):  # the default (stat) sees the touch
        run(load_config(cfg, overrides={"fingerprint": "stat"}))
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel value changed
    p.write_bytes(bytes(data))
    with pytest.raises(OutputDirError, match=r"'1.bmp': content sha256"):
        run(load_config(cfg))


# ----------------------------------------------------------------------------- the output-folder lock

_HOLD_LOCK = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "argv": "holder"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_lock_holder_is_named_and_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([PY, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by another run: pid {holder.pid} on host .*holder"):
            run(load_config(cfg))
        r = _cli(str(cfg), cwd=tmp_path)
        assert r.returncode == 1 and f"pid {holder.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (out / "run.json").exists()  # nothing written by the refused runs
    finally:
        holder.kill()
        holder.wait()
    report = run(load_config(cfg))  # the holder died: its lock is stale, taken over
    assert report.samples_written == 6
    assert any(f"pid {holder.pid}" in c and "without releasing" in c for c in report.changes)
    assert (out / ".lock").read_text() == ""  # released: no owner record left


def test_a_stale_lock_record_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    import socket

    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    report = run(load_config(_config(tmp_path)))
    assert report.samples_written == 6 and any(f"pid {dead}" in c for c in report.changes)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 16}},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"sleep": 0.15}},
    )
    out = tmp_path / "out"
    cmd = [PY, "-m", "captum_normgrad.cli", "run", str(cfg), "--no-progress", "--json"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=ENV)
    second = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "run.json").exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=ENV)
        results = [p.communicate(timeout=240) for p in (first, second)]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0, results[0][1]
    computed = json.loads(results[0][0])["shards_computed"]
    if second.returncode == 0:  # it started after the first had finished: everything skipped
        computed += json.loads(results[1][0])["shards_computed"]
    else:  # it overlapped: refused, naming the owner
        assert second.returncode == 1 and f"in use by another run: pid {first.pid}" in results[1][1], results[1]
        assert len(results[1][1].strip().splitlines()) == 1
    assert computed == 8, "work duplicated by two runs on one folder"
    index = json.loads((out / "index.json").read_text())
    assert sorted(s["index"] for s in index["samples"]) == list(range(16))


@pytest.mark.slow
def test_sigkill_releases_the_lock_and_resume_reports_it(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 12}},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"sleep": 0.05}},
    )
    out = tmp_path / "out"
    proc = subprocess.Popen([PY, "-m", "captum_normgrad.cli", "run", str(cfg), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 2:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid
    report = run(load_config(cfg))
    assert report.shards_skipped >= 2 and report.shards_skipped + report.shards_computed == 6
    assert any(f"pid {proc.pid}" in c for c in report.changes)
    ds, model = runner_helpers.TinyDataset(12), runner_helpers.tiny_cnn()
    idx, maps = RunOutput(out).maps("normgrad/2")
    assert idx.tolist() == list(range(12))
    torch.testing.assert_close(maps, _direct_normgrad(model, ds.x, ds.y, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find torchrun's workers")
def test_torchrun_workers_exit_when_the_launcher_is_killed(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": 400}},
        model={"source": "factory", "factory": f"{HELPERS}:tiny_cnn", "kwargs": {"sleep": 0.1}},
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "captum_normgrad.cli", "run", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path), start_new_session=True, env=ENV,
    )
    workers: Dict[int, int] = {}
    try:
        deadline = time.time() + 150
        while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        workers = runner_helpers.children_with_rank(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: the workers live in their own sessions
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers.values()):
            time.sleep(0.1)
        alive = [w for w in workers.values() if Path(f"/proc/{w}").exists() and "Z" not in _state(w)]
        assert alive == [], f"workers {alive} outlived their launcher"
    finally:
        for w in workers.values():
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the folder is resumable at once (the lock went with rank 0)
    h = json.loads((out / "run.json").read_text())["config_hash"]
    assert sum(shard_is_complete(out, s, h) is not None for s in range(200)) >= 2


@pytest.mark.slow
def test_under_torchrun_rank0_takes_the_lock_and_every_rank_stops(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([PY, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(
            [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "captum_normgrad.cli", "run", str(cfg), "--no-progress"],
            capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=240,
        )
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode != 0
    # rank 0 names the owner; rank 1 stops too (no rank waits for the others until the timeout)
    assert f"in use by another run: pid {holder.pid}" in r.stderr
    assert "rank 0 could not use the output directory" in r.stderr, r.stderr[-2000:]
    assert not (out / "run.json").exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


# ----------------------------------------------------------------------------- config against the data


def test_mean_of_the_wrong_length_fails_up_front(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 4, 0)
    cfg = _config(tmp_path, dataset={"kind": "folder", "root": "imgs", "image_size": 10, "mean": [0.5, 0.5],
                                     "std": [0.5, 0.5]}, target="prediction")
    with pytest.raises(ValueError, match=r"mean/std have 2 values but .* RGB \(3 channels\)"):
        run(load_config(cfg))
    assert not (tmp_path / "out").exists()
    r = _cli(str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "3 channels" in r.stderr and "unreadable" not in r.stdout, (r.stdout, r.stderr)
    with pytest.raises(ValueError, match="mean has 2 values but std has 3"):
        load_config(_config(tmp_path, "c2", dataset={"kind": "folder", "root": "imgs", "mean": [0.5, 0.5],
                                                     "std": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match="finite numbers"):
        load_config(_config(tmp_path, "c3", dataset={"kind": "folder", "root": "imgs", "mean": [0.5, 0.5, "x"],
                                                     "std": [1, 1, 1]}))


def test_every_sample_failing_in_the_probe_is_a_config_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, dataset={"kind": "factory", "factory": f"{HELPERS}:FlakyDataset",
                                     "kwargs": {"n": 10, "bad": list(range(10))}})
    with pytest.raises(ValueError, match=r"none of the first 8 samples could be read; first: \[0\] img0000: OSError: cannot read sample 0"):
        run(load_config(cfg))
    assert not (tmp_path / "out").exists()


def test_a_run_where_every_sample_fails_is_an_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, dataset={"kind": "factory", "factory": f"{HELPERS}:ReadOnceDataset", "kwargs": {"n": 6}})
    with pytest.raises(RunFailedError, match=r"no sample could be computed: all 6 failed \(first: \[0\] img0000: OSError"):
        run(load_config(cfg))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["samples"] == [] and len(index["failed"]) == 6
    r = _cli(str(cfg), "--output", str(tmp_path / "out2"), cwd=tmp_path)
    assert r.returncode == 1 and "no sample could be computed" in r.stderr, (r.stdout, r.stderr)


def test_a_model_that_cannot_take_the_samples_fails_up_front(tmp_path: Path) -> None:
    cfg = _config(tmp_path, target="prediction", dataset={"kind": "torchvision", "name": "FakeData",
                  "kwargs": {"size": 4, "image_size": [1, 12, 12], "num_classes": 3}})
    with pytest.raises(ValueError, match=r"model cannot take the dataset's samples: sample '0' of shape \(1, 12, 12\)"):
        run(load_config(cfg))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- symlinks, full disk


def test_symlinks_in_the_output_folder_are_never_written_through(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    run(load_config(cfg))
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    for name in ("index.json", "report.json"):
        (out / name).unlink()
        (out / name).symlink_to(victim)
    (out / "shards" / "shard-00001.done.json").unlink()
    (out / "shards" / "shard-00001.done.json").symlink_to(victim)  # an unreadable marker: recomputed
    report = run(load_config(cfg))
    assert report.shards_computed == 1
    assert victim.read_text() == "precious"
    for name in ("index.json", "report.json", "shards/shard-00001.done.json"):
        assert not (out / name).is_symlink() and json.loads((out / name).read_text())
    # the lock file as a link: refused, the target untouched
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OutputLockedError, match=r"\.lock is a symbolic link .*delete the link"):
        run(load_config(cfg))
    assert victim.read_text() == "precious"


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs root (mount -t tmpfs); the monkeypatched full-disk test in test_runner covers the logic")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:120]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_fails_loudly_then_resumes(tmp_path: Path, small_tmpfs: Path) -> None:
    n = 24
    cfg = _config(
        tmp_path,
        output=str(small_tmpfs / "out"),
        layers=["0", "2"],
        dataset={"kind": "factory", "factory": f"{HELPERS}:TinyDataset", "kwargs": {"n": n, "size": 32}},
    )
    with pytest.raises(ShardWriteError, match=r"could not write shard \d+ .*No space left on device.*NOT marked complete"):
        run(load_config(cfg))
    out = small_tmpfs / "out"
    h = json.loads((out / "run.json").read_text())["config_hash"]
    complete = [s for s in range(n // 2) if shard_is_complete(out, s, h) is not None]
    assert 0 < len(complete) < n // 2
    assert list(out.rglob("*.tmp")) == []
    r = _cli(str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "No space left" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    report = run(load_config(cfg))
    assert report.shards_skipped >= len(complete) and report.samples_written == n
    ds, model = runner_helpers.TinyDataset(n, size=32), runner_helpers.tiny_cnn()
    idx, maps = RunOutput(out).maps("normgrad/0")
    assert idx.tolist() == list(range(n))
    torch.testing.assert_close(maps, _direct_normgrad(model, ds.x, ds.y, 0), rtol=1e-5, atol=1e-6)


def test_full_disk_while_writing_the_index_names_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import captum_normgrad.runner.engine as engine

    real = engine.atomic_write_json

    def failing(path: Path, obj: Any) -> None:
        if Path(path).name == "index.json":
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(engine, "atomic_write_json", failing)
    cfg = _config(tmp_path)
    with pytest.raises(OSError, match=r"could not write .*index\.json \(No space left on device\); every shard is complete.*rerun"):
        run(load_config(cfg))
    monkeypatch.setattr(engine, "atomic_write_json", real)
    assert run(load_config(cfg)).shards_skipped == 3


# ----------------------------------------------------------------------------- preprocessing (issue 13)


def _pil(w: int, h: int):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64)[None, :, None], (h, 1, 3))  # horizontal ramp
    ramp[..., 1] = np.linspace(0, 255, h)[:, None]
    return Image.fromarray(ramp.astype(np.uint8))


def test_named_torchvision_weights_give_their_own_preprocessing(tmp_path: Path) -> None:
    from torchvision.models import ResNet18_Weights

    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.engine import preprocessing

    cfg = RunConfig.from_dict({"layers": ["layer4"], "dataset": {"kind": "folder", "root": "imgs"},
                               "model": {"source": "torchvision", "name": "resnet18", "weights": "IMAGENET1K_V1"}})
    t, desc = preprocessing(cfg)
    im = _pil(300, 200)
    ref = ResNet18_Weights.IMAGENET1K_V1.transforms()(im)  # torchvision's own preset
    torch.testing.assert_close(t(im), ref, rtol=0, atol=2e-6)
    assert desc["by"] == "weights ResNet18_Weights.IMAGENET1K_V1" and desc["centre_crop"] == 224
    # a checkpoint of a torchvision architecture: preprocess = "weights" uses its default weights'
    cfg2 = RunConfig.from_dict({"layers": ["layer4"], "dataset": {"kind": "folder", "root": "imgs", "preprocess": "weights"},
                                "model": {"source": "torchvision", "name": "resnet18", "checkpoint": "w.pt"}})
    torch.testing.assert_close(preprocessing(cfg2)[0](im), ResNet18_Weights.DEFAULT.transforms()(im), rtol=0, atol=2e-6)
    bad = RunConfig.from_dict({"layers": ["0"], "dataset": {"kind": "folder", "root": "imgs", "preprocess": "weights"},
                               "model": {"source": "factory", "factory": "x.py:f"}})
    with pytest.raises(ValueError, match="preprocess = 'weights' needs a torchvision classification model"):
        preprocessing(bad)


def test_a_torchvision_model_without_normalisation_warns(tmp_path: Path) -> None:
    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.engine import preprocessing

    d = {"layers": ["layer4"], "dataset": {"kind": "folder", "root": "imgs", "image_size": 32},
         "model": {"source": "torchvision", "name": "resnet18"}}
    with pytest.warns(UserWarning, match="without normalisation.*expect their weights' mean/std"):
        preprocessing(RunConfig.from_dict(d))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d["dataset"]["mean"], d["dataset"]["std"] = [0, 0, 0], [1, 1, 1]
        preprocessing(RunConfig.from_dict(d))  # [0, 1] inputs stated explicitly: no warning


def test_non_square_images_are_cropped_not_squashed(tmp_path: Path) -> None:
    from PIL import Image, ImageOps

    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.engine import preprocessing

    im = _pil(64, 32)  # 2:1
    d = {"layers": ["0"], "dataset": {"kind": "folder", "root": "imgs", "image_size": 16},
         "model": {"source": "factory", "factory": "x.py:f"}}
    x = preprocessing(RunConfig.from_dict(d))[0](im)
    to_t = lambda p: torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731
    fit = to_t(ImageOps.fit(im, (16, 16), Image.BILINEAR))  # reference: cover + centre crop
    squash = to_t(im.resize((16, 16), Image.BILINEAR))
    assert x.shape == (3, 16, 16)
    assert (x - fit).abs().mean() < 0.02 < (x - squash).abs().mean()
    # the horizontal ramp keeps its slope (a squash would double it)
    assert float(x[0, 8, -1] - x[0, 8, 0]) == pytest.approx(float(fit[0, 8, -1] - fit[0, 8, 0]), abs=0.05)
    d["dataset"]["resize"] = "stretch"  # asked for explicitly
    torch.testing.assert_close(preprocessing(RunConfig.from_dict(d))[0](im), squash, rtol=0, atol=0.03)
    d["dataset"]["image_size"] = [8, 24]  # non-square target: cover 8x24 then crop
    assert preprocessing(RunConfig.from_dict(d))[0](im).shape == (3, 8, 24)


def test_runner_with_a_torchvision_model_uses_its_weights_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    _pil(300, 200).save(tmp_path / "imgs" / "wide.png")
    _pil(200, 260).save(tmp_path / "imgs" / "tall.png")
    cfg = _config(tmp_path, layers=["layer4"], target="prediction",
                  dataset={"kind": "folder", "root": "imgs", "preprocess": "weights"},
                  model={"source": "torchvision", "name": "resnet18"})
    report = run(load_config(cfg))
    assert report.samples_written == 2
    res = RunOutput(tmp_path / "out")
    assert res.run["extra"]["preprocess"]["by"] == "weights ResNet18_Weights.IMAGENET1K_V1"
    assert res.maps("normgrad/layer4")[1].shape == (2, 1, 7, 7)  # 224 crop -> 7x7 at layer4


# ----------------------------------------------------------------------------- the audit script


def test_reliability_audit_script_classifies_and_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reliability_audit", HERE.parent / "scripts" / "reliability_audit.py")
    audit = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reliability_audit", audit)  # dataclasses look their module up
    spec.loader.exec_module(audit)
    out = tmp_path / "audit.json"
    assert audit.main(["--area", "runner", "-k", "_size", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["counts"]["tried"] == 2 and data["counts"]["clear"] == 2  # batch_size 0, shard_size -1
    assert "tried 2: clear error 2, unclear error 0, silent 0" in capsys.readouterr().out
    # the classifier itself: a silent bad input, an internal error, a dependency's message, a clear one
    ctx = None

    def case(fn, pattern="thing", odd=False):
        return audit.classify(audit.Case("api", "x", fn, pattern, odd=odd), ctx).verdict

    assert case(lambda c: None) == "silent"
    assert case(lambda c: None, odd=True) == "ok"
    assert case(lambda c: [][1]) == "unclear"  # IndexError
    assert case(lambda c: torch.ones(2) @ torch.ones(3)) == "unclear"  # raised inside torch
    assert case(lambda c: normalize_maps(torch.tensor([[float("nan")]])), r"nan") == "clear"
    assert case(lambda c: normalize_maps(torch.tensor([[float("nan")]])), r"tolerance") == "unclear"  # not named


def test_normalize_maps_keeps_an_empty_batch_and_refuses_a_scalar() -> None:
    assert normalize_maps(torch.zeros(0, 1, 4, 4)).shape == (0, 1, 4, 4)
    with pytest.raises(ValueError, match="0-dim"):
        normalize_maps(torch.tensor(1.0))
