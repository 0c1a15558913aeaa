r"""Shared helpers of the speed and memory benchmarks (``bench_order0``, ``bench_order1``, ``bench_speed``).

Timing
------
:func:`interleaved_timings` runs several callables **in one process, interleaved**: every round runs
each callable once, in an order that rotates from round to round, so slow drifts of a shared, noisy
machine (other processes, thermal state, allocator warm-up) hit every method alike. Each call is
timed with :func:`time.perf_counter`; on CUDA the device is synchronised before and after each call,
so the time covers the kernels, not only their launch. Results are summarised by their **median**
(:func:`summarize`); ratios are given both as the ratio of medians and as the median of per-round
ratios (:func:`paired_ratio`), which is robust to load that changes between rounds.

Peak memory
-----------
:func:`peak_memory` measures the extra memory a call needs at its peak, above what was allocated
before the call:

* **CUDA** — ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``, minus
  ``torch.cuda.memory_allocated`` before the call: exact bytes of live tensors (caching-allocator
  level), the usual PyTorch figure.
* **CPU** (``method="vmhwm"``, used when possible) — the process' resident-set high-water mark
  ``VmHWM`` from ``/proc/self/status``. Before the call the kernel's peak counter is reset to the
  current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and free heap memory is
  returned to the OS with glibc's ``malloc_trim(0)``, so ``VmHWM_after - VmRSS_before`` is the peak
  extra resident memory of the call. PyTorch's CPU allocator hands large blocks straight to
  ``malloc``/``mmap``, so this follows tensor memory closely (it also counts allocator slack and any
  temporary buffers of the kernels, which a tensor-level count would miss). ``tracemalloc`` is not
  used: it sees Python objects only, not tensor storage.
* **CPU fallback** (``method="rss-sampling"``) — where ``clear_refs`` is not writable, a background
  thread samples ``VmRSS`` every 0.5 ms during the call; short peaks can be missed (a lower bound).

The method actually used is returned with the figure and recorded in every result file.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "Stats",
    "summarize",
    "median",
    "paired_ratio",
    "interleaved_timings",
    "peak_memory",
    "read_proc_status",
    "environment",
    "markdown_table",
    "write_results",
    "command_line",
    "device_sync",
    "fmt_ms",
    "fmt_mib",
    "torchvision_model",
    "loadavg",
    "describe_load",
]

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings in seconds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def median(values: Iterable[float]) -> float:
    """The median of a non-empty sequence (mean of the two middle values for even lengths)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(vals))


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default 'linear' method) of sorted values."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> Stats:
    """Median, quartiles, extremes and count of a non-empty sequence of timings."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("cannot summarize an empty sequence of timings")
    return Stats(
        median=median(vals),
        q1=_quantile(vals, 0.25),
        q3=_quantile(vals, 0.75),
        min=vals[0],
        max=vals[-1],
        n=len(vals),
    )


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (timings of the same interleaved round)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty sequences, got {len(num)} and {len(den)}")
    return median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------- timing


def device_sync(device: Any) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def interleaved_timings(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Optional[Callable[[], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[float]]:
    """Time every callable ``repeats`` times, interleaved, in this process.

    Round ``r`` runs the callables in the order of ``fns`` rotated by ``r`` positions, so that no
    method always runs first (right after another method has warmed or trashed the caches).
    ``warmup`` untimed rounds come first.

    Args:
        fns: name -> zero-argument callable.
        repeats: timed rounds (>= 1).
        warmup: untimed rounds before (>= 0).
        sync: called before starting and after finishing each timed call (CUDA synchronisation).
        progress: called with 1 after every round (e.g. ``tqdm.update``).
        clock: the clock, seconds.

    Returns:
        name -> list of ``repeats`` durations in seconds, in round order (so that ``paired_ratio``
        can pair the rounds).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not fns:
        raise ValueError("no callables to time")
    names = list(fns)
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        wait()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            wait()
            t0 = clock()
            fns[name]()
            wait()
            times[name].append(clock() - t0)
        if progress is not None:
            progress(1)
    return times


# --------------------------------------------------------------------------- memory


def read_proc_status(fields: Sequence[str] = ("VmRSS", "VmHWM")) -> Dict[str, int]:
    """Selected ``/proc/self/status`` fields in bytes (an empty dict where /proc is missing)."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in fields:
                    out[key] = int(rest.split()[0]) * 1024  # kB
    except OSError:
        return {}
    return out


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: Any = "cpu") -> Tuple[int, str]:
    """Peak extra memory (bytes) that one call of ``fn`` needs above the memory in use before it.

    The call's return value is dropped before the function returns. See the module docstring for
    the methods; the second element of the result names the one used: ``"cuda-max-allocated"``,
    ``"vmhwm"`` or ``"rss-sampling"``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del out
        return int(peak), "cuda-max-allocated"
    if not read_proc_status():
        raise RuntimeError("CPU peak memory needs /proc/self/status (Linux)")
    _malloc_trim()
    if _reset_hwm():
        base = read_proc_status()["VmRSS"]
        out = fn()
        peak = read_proc_status()["VmHWM"] - base
        del out
        return max(int(peak), 0), "vmhwm"
    base = read_proc_status()["VmRSS"]
    top = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            top[0] = max(top[0], read_proc_status().get("VmRSS", 0))
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    top[0] = max(top[0], read_proc_status().get("VmRSS", 0))
    del out
    return max(int(top[0] - base), 0), "rss-sampling"


# --------------------------------------------------------------------------- models


def torchvision_model(name: str, seed: int = 0, device: Any = "cpu") -> torch.nn.Module:
    """A torchvision classifier with seeded random weights (no download), in eval mode, built by
    the package's one model loader."""
    from captum_normgrad.models import torchvision_model as build

    torch.manual_seed(seed)
    return build(name).to(device)


# --------------------------------------------------------------------------- reporting


def environment(device: Any = "cpu") -> Dict[str, Any]:
    """Machine, library versions and load, recorded with every result."""
    import captum
    import torchvision

    dev = torch.device(device)
    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "captum": captum.__version__,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
    }
    info["loadavg_at_start"] = loadavg()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where unavailable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe_load(env: Mapping[str, Any]) -> str:
    """'1-min load average a -> b on N cores' from an :func:`environment` record (empty if unknown)."""
    start, end = env.get("loadavg_at_start"), env.get("loadavg_at_end")
    if not start:
        return ""
    text = f"1-min load average {start[0]}" + (f" -> {end[0]}" if end else "")
    return text + f" on {env.get('cpu_count')} cores."


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(script: Optional[os.PathLike] = None, argv: Optional[Sequence[str]] = None) -> str:
    """The command being run, as a user would retype it from the repository root.

    ``script`` defaults to ``sys.argv[0]`` and ``argv`` (the arguments) to ``sys.argv[1:]``.
    """
    path = Path(script if script is not None else sys.argv[0]).resolve()
    root = Path(__file__).resolve().parents[1]
    try:
        shown = str(path.relative_to(root))
    except ValueError:
        shown = str(path)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", shown, *args])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    head = "| " + " | ".join(str(h) for h in headers) + " |"
    rule = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    for row in body:
        if row.count("|") != head.count("|"):
            raise ValueError(f"row with the wrong number of cells: {row}")
    return "\n".join([head, rule, *body])


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with 3 significant digits."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes: Optional[float]) -> str:
    """Bytes as MiB (one decimal), or an en dash for a missing figure."""
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f}"


def write_results(stem: str, out_dir: Optional[os.PathLike], payload: Mapping[str, Any], markdown: str) -> Tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md``; return both paths."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def emit(stem: str, out_dir: Optional[os.PathLike], payload: Mapping[str, Any], markdown: str) -> int:
    """Write the result fragments, print the Markdown and where it went; the script's exit code (0)."""
    jpath, mpath = write_results(stem, out_dir, payload, markdown)
    print(markdown)
    print(f"\nwrote {jpath} and {mpath}")
    return 0


def publish(
    stem: str,
    script: str,
    argv: Optional[Sequence[str]],
    args: Any,
    env: Dict[str, Any],
    results: Any,
    to_markdown: Callable[[Dict[str, Any]], str],
    targets: Optional[Callable[[Any], Any]] = None,
    exclude: Sequence[str] = ("out", "no_progress"),
) -> int:
    """The standard payload of a benchmark (command, environment, settings, results, targets), emitted."""
    payload: Dict[str, Any] = {
        "benchmark": stem,
        "command": command_line(script, argv),
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k not in exclude},
        "results": results,
    }
    if targets is not None:
        payload["targets"] = targets(results)
    return emit(stem, args.out, payload, to_markdown(payload))
