"""Tests of the benchmark helpers (``benchmarks/_timing.py``) and of the explicit unfold reference of
``benchmarks/bench_order0.py``.

The unfold reference is checked against brute force (each location's weight-gradient contribution
obtained by autograd on the convolution's weights, the input-grid accumulation as the adjoint of a
ones-kernel convolution), and then against ``LayerNormGrad(virtual_layer="weights")``: the two
independent routes must agree, which cross-checks the package's closed forms too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _timing  # noqa: E402
import bench_order0  # noqa: E402

from captum_normgrad import LayerNormGrad  # noqa: E402

AGGS = ["norm", "filter_norm", "sum", "max"]


# --------------------------------------------------------------------------- statistics


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=40))
def test_summarize_matches_numpy(values):
    s = _timing.summarize(values)
    arr = np.asarray(values, dtype=float)
    assert s.median == pytest.approx(float(np.median(arr)))
    assert s.q1 == pytest.approx(float(np.percentile(arr, 25)))
    assert s.q3 == pytest.approx(float(np.percentile(arr, 75)))
    assert (s.min, s.max, s.n) == (arr.min(), arr.max(), len(values))
    assert _timing.median(values) == pytest.approx(float(np.median(arr)))


def test_paired_ratio_pairs_rounds():
    # round 2 is slow for both methods: the pairing cancels it, the ratio of medians does not
    num = [2.0, 2.2, 20.0, 1.8, 2.1]
    den = [1.0, 1.0, 10.0, 1.0, 1.0]
    expected = float(np.median(np.asarray(num) / np.asarray(den)))
    assert _timing.paired_ratio(num, den) == pytest.approx(expected)
    with pytest.raises(ValueError, match="equally long"):
        _timing.paired_ratio([1.0], [1.0, 2.0])


def test_empty_sequences_raise():
    with pytest.raises(ValueError, match="empty"):
        _timing.summarize([])
    with pytest.raises(ValueError, match="empty"):
        _timing.median([])


# --------------------------------------------------------------------------- interleaving


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_interleaved_timings_durations_order_warmup_and_sync():
    clock = FakeClock()
    calls: list = []
    cost = {"a": 1.0, "b": 2.5, "c": 0.25}

    def make(name):
        def fn():
            calls.append(name)
            clock.t += cost[name] * calls.count(name)  # the k-th call of a method costs k * cost

        return fn

    syncs = []
    rounds = []
    times = _timing.interleaved_timings(
        {k: make(k) for k in cost}, repeats=4, warmup=2, sync=lambda: syncs.append(1),
        progress=rounds.append, clock=clock,
    )
    # 2 warm-up rounds in the given order, then rotated rounds
    assert calls[:6] == ["a", "b", "c"] * 2
    timed = calls[6:]
    assert [timed[3 * r : 3 * r + 3] for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"],
    ]
    # the j-th timed call (from 0) of a method is its (3 + j)-th call overall
    for name, c in cost.items():
        assert times[name] == pytest.approx([c * (3 + j) for j in range(4)])
    assert len(rounds) == 4 and sum(rounds) == 4
    assert len(syncs) == 2 + 2 * 3 * 4  # once per warm-up round, twice per timed call


def test_interleaved_timings_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        _timing.interleaved_timings({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        _timing.interleaved_timings({"a": lambda: None}, repeats=1, warmup=-1)
    with pytest.raises(ValueError, match="no callables"):
        _timing.interleaved_timings({}, repeats=1)


def test_interleaved_timings_real_clock_orders_work():
    import time

    times = _timing.interleaved_timings(
        {"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.02)}, repeats=3, warmup=0
    )
    assert _timing.median(times["long"]) > _timing.median(times["short"])
    assert all(t >= 0.02 for t in times["long"])


# --------------------------------------------------------------------------- memory


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_cpu_sees_a_tensor_that_is_freed_before_return():
    nbytes = 96 * 2**20

    def fn():
        t = torch.ones(nbytes // 4)  # written, so resident
        return float(t[::4096].sum())  # the tensor itself is freed before fn returns

    peak, method = _timing.peak_memory(fn, "cpu")
    assert method in ("vmhwm", "rss-sampling")
    if method == "vmhwm":
        assert 0.9 * nbytes <= peak <= 2.0 * nbytes
    else:  # sampling may miss part of a short peak
        assert peak <= 2.0 * nbytes
    small, _ = _timing.peak_memory(lambda: None, "cpu")
    assert small < 0.25 * nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    nbytes = 64 * 2**20
    peak, method = _timing.peak_memory(lambda: float(torch.ones(nbytes // 4, device="cuda").sum()), "cuda")
    assert method == "cuda-max-allocated"
    assert nbytes <= peak <= 1.1 * nbytes


def test_read_proc_status_fields():
    info = _timing.read_proc_status()
    if Path("/proc/self/status").exists():
        assert set(info) == {"VmRSS", "VmHWM"} and info["VmHWM"] >= info["VmRSS"] > 0
    else:
        assert info == {}


# --------------------------------------------------------------------------- reporting


def test_markdown_table_and_write_results(tmp_path):
    table = _timing.markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    with pytest.raises(ValueError, match="wrong number of cells"):
        _timing.markdown_table(["a", "b"], [[1, 2, 3]])
    payload = {"benchmark": "demo", "results": [1, 2]}
    jpath, mpath = _timing.write_results("demo", tmp_path / "sub", payload, table)
    assert json.loads(jpath.read_text()) == payload
    assert mpath.read_text() == table + "\n"
    assert (_timing.fmt_ms(0.01234), _timing.fmt_ms(1.5), _timing.fmt_mib(3 * 2**20), _timing.fmt_mib(None)) == (
        "12.3", "1500", "3.0", "–",
    )


def test_command_line_is_relative_to_the_repository():
    script = BENCH / "bench_order0.py"
    assert _timing.command_line(script, ["--quick", "--out", "/tmp/x"]) == (
        "python benchmarks/bench_order0.py --quick --out /tmp/x"
    )
    assert _timing.command_line("/elsewhere/run.py", []) == "python /elsewhere/run.py"


def test_environment_records_versions():
    env = _timing.environment("cpu")
    for key in ("torch", "captum", "torchvision", "torch_threads", "device", "cpu"):
        assert key in env
    assert env["device"] == "cpu"


# --------------------------------------------------------------------------- the unfold reference

# (in, out, kernel, stride, padding, dilation, groups, padding_mode)
GEOMETRIES = [
    (3, 4, 3, 1, 1, 1, 1, "zeros"),
    (4, 6, 3, 2, 1, 1, 2, "zeros"),
    (2, 3, (2, 3), (2, 1), (0, 2), (1, 2), 1, "zeros"),
    (4, 4, 3, 1, 2, 2, 4, "zeros"),
    (3, 2, 3, 2, 1, 1, 1, "reflect"),
    (2, 4, 3, 1, 1, 1, 2, "circular"),
    (3, 3, 5, 3, 2, 1, 1, "replicate"),
    (2, 2, 3, 1, "same", 2, 1, "zeros"),
]


def _conv(geom, seed=0):
    cin, cout, k, s, p, d, g, mode = geom
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode).double()


def _per_location_contributions(conv, x, g_out):
    """Brute force: T_u as the weight gradient of the conv with the output gradient kept at u only."""
    w = conv.weight.detach().clone().requires_grad_()
    ho, wo = g_out.shape[-2:]
    out = {}
    for i in range(ho):
        for j in range(wo):
            mask = torch.zeros_like(g_out)
            mask[..., i, j] = 1
            per_sample = []
            for n in range(x.shape[0]):
                y = conv._conv_forward(x[n : n + 1], w, None)
                (gw,) = torch.autograd.grad(y, w, grad_outputs=(g_out * mask)[n : n + 1])
                per_sample.append(gw)
            out[(i, j)] = torch.stack(per_sample)  # (N, C_out, C_in/G, kh, kw)
    return out


def _block_entries(t, groups):
    """Entries of the block-diagonal contribution: the weight-shaped tensor holds exactly the blocks."""
    return t.reshape(t.shape[0], -1)


def _brute_aggregate(flat, aggregation):
    if aggregation == "norm":
        return flat.norm(dim=1)
    if aggregation == "filter_norm":
        return flat.clamp(min=0).norm(dim=1)
    if aggregation == "sum":
        return flat.sum(1)
    return flat.amax(1)


@pytest.mark.parametrize("geom", GEOMETRIES[:6])
def test_unfold_reference_equals_brute_force_per_location(geom):
    conv = _conv(geom)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, conv.in_channels, 6, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    g_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    contributions = _per_location_contributions(conv, x, g_out)
    for aggregation in AGGS:
        ref = bench_order0.unfold_weights_map(x, g_out, conv, aggregation, grid="output")
        assert ref.shape == (2, 1, *y.shape[-2:])
        for (i, j), t in contributions.items():
            expected = _brute_aggregate(_block_entries(t, conv.groups), aggregation)
            torch.testing.assert_close(ref[:, 0, i, j], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_unfold_reference_input_grid_is_the_adjoint_of_the_patch_sum(geom):
    conv = _conv(geom)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, conv.in_channels, 8, 7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    g_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    m_out = bench_order0.unfold_weights_map(x, g_out, conv, "norm", grid="output")
    m_in = bench_order0.unfold_weights_map(x, g_out, conv, "norm", grid="input")
    # a one-channel conv with a ones kernel and the layer's geometry sums each patch; its adjoint
    # adds every location's value onto each input pixel of its patch (padded pixels folded back)
    ones = nn.Conv2d(1, 1, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                     bias=False, padding_mode=conv.padding_mode).double()
    z = torch.zeros(2, 1, *x.shape[-2:], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(ones._conv_forward(z, torch.ones_like(ones.weight), None), z, m_out)
    torch.testing.assert_close(m_in, expected, rtol=1e-12, atol=1e-12)


def test_unfold_factorised_equals_outer():
    conv = _conv(GEOMETRIES[1])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, conv.in_channels, 9, 9, generator=gen, dtype=torch.float64)
    g_out = torch.randn(conv(x).shape, generator=gen, dtype=torch.float64)
    for grid in ("input", "output"):
        torch.testing.assert_close(
            bench_order0.unfold_weights_map(x, g_out, conv, grid=grid, method="factorised"),
            bench_order0.unfold_weights_map(x, g_out, conv, grid=grid, method="outer", max_elements=1),
        )
    with pytest.raises(ValueError, match="factorised"):
        bench_order0.unfold_weights_map(x, g_out, conv, "sum", method="factorised")
    with pytest.raises(TypeError, match="Conv2d"):
        bench_order0.unfold_weights_map(x, g_out, nn.Linear(2, 2))


def _model_around(conv, n_classes=5):
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(2, conv.in_channels, 3, padding=1), nn.Tanh(), conv, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(conv.out_channels * 4, n_classes)
                         ).double().eval()


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("grid", ["input", "output"])
def test_unfold_reference_equals_layernormgrad_weights(geom, grid):
    conv = _conv(geom)
    model = _model_around(conv)
    x = torch.randn(3, 2, 9, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = [0, 3, 1]
    for aggregation in AGGS:
        ours = LayerNormGrad(model, conv).attribute(x, target, virtual_layer="weights", aggregation=aggregation,
                                                    weights_grid=grid)
        ref = bench_order0.unfold_reference_attribute(model, conv, x, target, aggregation, grid)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin_per_g=st.integers(1, 3), cout_per_g=st.integers(1, 3), groups=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3), dil=st.integers(1, 2),
    pad=st.integers(0, 2), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    h=st.integers(6, 10), w=st.integers(6, 10), aggregation=st.sampled_from(AGGS),
    grid=st.sampled_from(["input", "output"]),
)
def test_unfold_reference_equals_layernormgrad_random_geometry(cin_per_g, cout_per_g, groups, kh, kw, stride, dil,
                                                               pad, mode, h, w, aggregation, grid):
    if mode != "zeros" and pad == 0:
        mode = "zeros"
    torch.manual_seed(0)
    conv = nn.Conv2d(cin_per_g * groups, cout_per_g * groups, (kh, kw), stride=stride, padding=pad, dilation=dil,
                     groups=groups, padding_mode=mode).double()
    model = _model_around(conv, n_classes=3)
    if (h + 2 * pad - dil * (kh - 1)) < 1 or (w + 2 * pad - dil * (kw - 1)) < 1:
        return  # no output location; the geometry does not fit the image
    x = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(h * 31 + w), dtype=torch.float64)
    ours = LayerNormGrad(model, conv).attribute(x, 2, virtual_layer="weights", aggregation=aggregation,
                                                weights_grid=grid)
    ref = bench_order0.unfold_reference_attribute(model, conv, x, 2, aggregation, grid)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_capture_conv_io_leaves_the_model_alone():
    conv = _conv(GEOMETRIES[0])
    model = _model_around(conv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    x_in, g = bench_order0.capture_conv_io(model, conv, x, 1)
    assert x_in.shape == (2, 3, 6, 6) and g.shape == (2, 4, 6, 6)
    assert not conv._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # g is the gradient of the target logits w.r.t. the conv output: check against autograd by hand
    y = conv(model[1](model[0](x))).detach().requires_grad_()
    logits = model[6](model[5](model[4](model[3](y))))
    (expected,) = torch.autograd.grad(logits[:, 1].sum(), y)
    torch.testing.assert_close(g, expected)


# --------------------------------------------------------------------------- smoke


def test_bench_order0_quick_writes_fragments(tmp_path, capsys):
    assert bench_order0.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "bench_order0.json").read_text())
    assert payload["benchmark"] == "bench_order0"
    assert {"gradcam", "weights", "map_stage"} <= set(payload["results"])
    md = (tmp_path / "bench_order0.md").read_text()
    assert f"Command: `python benchmarks/bench_order0.py --quick --out {tmp_path} --no-progress`" in md
    assert payload["results"]["map_stage"][0]["max_rel_diff_vs_outer"] < 1e-4


def test_bench_order1_quick_writes_fragments(tmp_path, capsys):
    import bench_order1

    assert bench_order1.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    payload = json.loads((tmp_path / "bench_order1.json").read_text())
    (row,) = payload["results"]["speed"]
    for key in ("order0_s", "finite_difference_s", "exact_s", "none_s", "naive_loop_s", "floor_s"):
        assert row[key]["n"] == 1
    # the naive per-sample loop and LayerNormGradOrder1 compute the same maps
    assert row["max_rel_diff_naive_vs_ours"] < 1e-4
    assert payload["results"]["memory"][0]["finite_difference_bytes"] >= 0
    assert "python benchmarks/bench_order1.py --quick" in (tmp_path / "bench_order1.md").read_text()


def test_bench_speed_quick_writes_fragments(tmp_path, capsys):
    import bench_speed

    assert bench_speed.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "bench_speed.json").read_text())["results"]
    assert [r["method"] for r in rows] == list(bench_speed.METHODS)
    assert next(r for r in rows if r["method"] == "LayerGradCam")["ratio_to_gradcam"] == 1.0
    assert all(r["time_s"]["median"] > 0 and r["peak_bytes"] >= 0 for r in rows)
    md = (tmp_path / "bench_speed.md").read_text()
    assert "| NormGrad weights |" in md and "python benchmarks/bench_speed.py --quick" in md


def test_naive_order1_matches_an_explicitly_stepped_deep_copy():
    """The naive per-sample loop of bench_order1 against explicit SGD steps on deep copies."""
    import copy

    import bench_order1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = [2, 0]
    eps = 1e-2
    # the paper's formula by hand: deep copies stepped in place, theta_pm = theta +- h v
    got = bench_order1.naive_order1(model, model[2], x, target, epsilon=eps)
    for i in range(2):
        def grads(m):
            acts = {}
            h = m[2].register_forward_hook(lambda mod, inp, out: acts.setdefault("a", out))
            loss = F.cross_entropy(m(x[i : i + 1]), torch.tensor([target[i]]), reduction="sum")
            h.remove()
            ps = list(m.parameters())
            g = torch.autograd.grad(loss, [acts["a"], *ps])
            return acts["a"].detach(), g[0], g[1:]

        stepped = copy.deepcopy(model)
        _, _, g1 = grads(stepped)
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), g1):
                p -= eps * g
        a, gp, v = grads(stepped)
        hh = 0.5 / torch.sqrt(sum(t.square().sum() for t in v))
        plus, minus = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            for pp, pm, t in zip(plus.parameters(), minus.parameters(), v):
                pp += hh * t
                pm -= hh * t
        _, g_plus, _ = grads(plus)
        _, g_minus, _ = grads(minus)
        expected = (gp - eps / (2 * hh) * (g_plus - g_minus)).norm(dim=1) * a.norm(dim=1)
        torch.testing.assert_close(got[i : i + 1, 0], expected)
    assert all(p.grad is None for p in model.parameters())
