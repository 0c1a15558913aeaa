"""Factories and the torchrun worker used by tests/test_runner.py (referenced as ``file.py:callable``).

Kept free of pytest so torchrun workers and ``python -m captum_normgrad.cli run`` subprocesses can
import it by path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

#: The torchrun launcher of this interpreter (its console script, else the module).
TORCHRUN = (
    [str(Path(sys.executable).parent / "torchrun")]
    if (Path(sys.executable).parent / "torchrun").is_file()
    else [sys.executable, "-m", "torch.distributed.run"]
)


class TinyDataset(torch.utils.data.Dataset):
    """``n`` random 3x12x12 images with labels in ``range(classes)``, deterministic from ``seed``."""

    def __init__(self, n: int = 24, size: int = 12, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def sample_id(self, i: int) -> str:
        return f"img{i:04d}"

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class FlakyDataset(TinyDataset):
    """A :class:`TinyDataset` whose items ``bad`` raise ``OSError`` (unreadable files)."""

    def __init__(self, n: int = 10, bad: tuple = (), **kw) -> None:
        super().__init__(n, **kw)
        self.bad = set(bad)

    def __getitem__(self, i: int):
        if i in self.bad:
            raise OSError(f"cannot read sample {i}")
        return super().__getitem__(i)


class ReadOnceDataset(TinyDataset):
    """A :class:`TinyDataset` whose items can be read once only: a second read raises ``OSError``.

    The runner's up-front check reads the first samples, so the run itself then finds every sample
    unreadable (a run where every sample fails, past the check).
    """

    def __init__(self, n: int = 6, **kw) -> None:
        super().__init__(n, **kw)
        self.seen: set = set()

    def __getitem__(self, i: int):
        if i in self.seen or i >= 8:
            raise OSError(f"sample {i} vanished")
        self.seen.add(i)
        return super().__getitem__(i)


def children_with_rank(parent: int) -> dict:
    """``{RANK: pid}`` of the direct children of ``parent`` (torchrun's workers), from /proc."""
    from pathlib import Path as _P

    out: dict = {}
    for d in _P("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(d.name)
    return out


class _Slow(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def tiny_cnn(classes: int = 3, sleep: float = 0.0) -> nn.Sequential:
    """conv(3->4) relu conv(4->6) relu gap linear; ``sleep`` seconds per forward (for kill tests)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if sleep:
        model.append(_Slow(sleep))
    return model.eval()


def worker_main(config: str, out: str, result: str) -> None:
    """torchrun entry: a run, then a per-rank Welford all-reduce on rank-dependent data."""
    import torch.distributed as dist

    from captum_normgrad.runner import WelfordState, all_reduce_welford, load_config, run

    import os

    # run() starts (and ends) its own process group from the torchrun environment
    report = run(load_config(config, overrides={"output": out, "progress": False}))
    assert not dist.is_initialized()
    # the generic per-rank merge on a fresh group (a file store: torchrun's store is done with):
    # rank r holds rows r, r + W, r + 2W, ... of a fixed matrix
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{result}.store", rank=rank, world_size=world)
    values = torch.arange(0, 7 * 5, dtype=torch.float64).reshape(7, 5).sin() * 3 + 1
    merged = all_reduce_welford(WelfordState(5).update(values[rank::world]))
    Path(f"{result}.rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world": world,
                "report": report.to_dict(),
                "welford": {"count": merged.count, "mean": merged.mean.tolist(), "m2": merged.m2.tolist()},
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(*sys.argv[1:4])
