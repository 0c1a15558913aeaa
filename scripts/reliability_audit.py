#!/usr/bin/env python
"""Reliability audit: try a catalogue of bad or odd inputs against the API, the CLI and the runner.

Every case is classified honestly from what the package does, not from what it should do:

* ``clear``   - an error (exception, or non-zero exit of the CLI) whose message is ONE line, is not
                an internal error type (IndexError, KeyError, AttributeError, AssertionError, ...)
                and names the problem (matches the case's pattern, e.g. ``channel_dim`` for an
                out-of-range ``channel_dim``);
* ``unclear`` - an error, but a traceback, several lines, an internal error type, or a message
                that does not name the problem;
* ``silent``  - a bad input accepted without error (exit 0 / no exception), or an odd input
                handled with a wrong result (a model changed, a file overwritten, pixels clipped);
* ``ok``      - an odd but valid input handled correctly (only for cases marked ``odd``).

Usage::

    python scripts/reliability_audit.py                # every case, table + counts
    python scripts/reliability_audit.py --area runner  # api, cli or runner only
    python scripts/reliability_audit.py --json audit.json

Runs on the CPU in about a minute (OMP_NUM_THREADS=1 recommended). Exit code 0 whatever the
counts: it reports, it does not judge; ``--fail-on-silent`` exits 1 when a case is silent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INTERNAL = (IndexError, KeyError, AttributeError, AssertionError, ZeroDivisionError, UnboundLocalError, NameError,
            RecursionError, NotImplementedError)
EXPECTED = (ValueError, TypeError, OSError, LookupError, RuntimeError)


class Silent(Exception):
    """Raised by an ``odd`` case when the result is wrong although no error was raised."""


@dataclass
class Case:
    area: str  # "api", "cli" or "runner"
    name: str
    fn: Callable[["Ctx"], Any]
    pattern: str  # what a clear message must name (regex, case-insensitive)
    odd: bool = False  # an odd but valid input: correct handling is "ok", a clean refusal "clear"
    refusal_ok: bool = True  # for odd cases: False when any error is wrong (e.g. --skip-unreadable aborting)
    source: str = ""  # where the case comes from (issue 15 ...)


@dataclass
class Result:
    area: str
    name: str
    verdict: str
    detail: str
    seconds: float
    source: str = ""


# ------------------------------------------------------------------------------------ fixtures
FACTORIES = r'''
import torch
from torch import nn


def tiny_cnn(classes: int = 3, in_channels: int = 3) -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def tiny_cnn_seed2() -> nn.Sequential:
    m = tiny_cnn()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 6, size: int = 12, bad=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def sample_id(self, i):
        return f"img{i:04d}"

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError(f"cannot read sample {i}")
        return self.x[i], int(self.y[i])
'''


class Ctx:
    """Temporary folder with images, factories and configs shared by the cases."""

    def __init__(self, root: Path) -> None:
        from PIL import Image

        self.root = root
        self.factories = root / "factories.py"
        self.factories.write_text(FACTORIES)
        rng = np.random.default_rng(0)
        self.imgs = root / "imgs"
        self.imgs.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(self.imgs / f"{i}.png")
        self.image = self.imgs / "0.png"
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        p = self.root / f"{self.n:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', name)[:40]}"
        p.mkdir()
        return p

    def model(self, bn: bool = False) -> nn.Module:
        g = torch.Generator().manual_seed(0)
        layers: List[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
        if bn:
            layers.append(nn.BatchNorm2d(4))
        layers += [nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(6, 3)]
        m = nn.Sequential(*layers)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return m.eval()

    def x(self, n: int = 2) -> torch.Tensor:
        return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def run_config(self, folder: Path, **over: Any) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {
            "output": str(folder / "out"),
            "batch_size": 2,
            "shard_size": 2,
            "layers": ["2"],
            "methods": ["normgrad"],
            "threads": 1,
            "progress": False,
            "dataset": {"kind": "factory", "factory": f"{self.factories}:TinyDataset", "kwargs": {"n": 6}},
            "model": {"source": "factory", "factory": f"{self.factories}:tiny_cnn"},
        }
        cfg.update(over)
        return cfg


def _state(m: nn.Module) -> Dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in m.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in m.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in m.named_parameters()},
        "rg": {k: v.requires_grad for k, v in m.named_parameters()},
        "training": [mod.training for mod in m.modules()],
        "hooks": [(len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks)) for mod in m.modules()],
    }


def _same_state(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[str]:
    for key in ("params", "buffers"):
        for k in a[key]:
            if not torch.equal(a[key][k], b[key][k]):
                return f"{key[:-1]} {k} changed"
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        if (ga is None) != (gb is None) or (ga is not None and not torch.equal(ga, gb)):
            return f".grad of {k} changed"
    if a["rg"] != b["rg"]:
        return "requires_grad flags changed"
    if a["training"] != b["training"]:
        return "training mode changed"
    if a["hooks"] != b["hooks"]:
        return "hooks left on the model"
    return None


# ------------------------------------------------------------------------------------ API cases
def _ng(ctx: Ctx, **kw: Any) -> Any:
    from captum_normgrad import LayerNormGrad

    m = ctx.model()
    return LayerNormGrad(m, m[2]).attribute(kw.pop("x", ctx.x()), target=kw.pop("target", 0), **kw)


def _ng1(ctx: Ctx, model: Optional[nn.Module] = None, **kw: Any) -> Any:
    from captum_normgrad import LayerNormGradOrder1

    m = model if model is not None else ctx.model()
    return LayerNormGradOrder1(m, m[2]).attribute(kw.pop("x", ctx.x()), target=kw.pop("target", 0), **kw)


def _ps(ctx: Ctx, model: Optional[nn.Module] = None, x: Optional[torch.Tensor] = None, target: Any = None) -> Any:
    from captum_normgrad import ParameterSaliency

    m = model if model is not None else ctx.model()
    return ParameterSaliency(m, mode="naive").profiles(ctx.x() if x is None else x,
                                                       torch.tensor([0, 1]) if target is None else target)


def _empty_ok(out: Any) -> None:
    t = out[0] if isinstance(out, (list, tuple)) else out
    if not isinstance(t, torch.Tensor) or t.shape[0] != 0 or not bool(torch.isfinite(t).all()):
        raise Silent(f"an empty batch gave {type(t).__name__} {tuple(getattr(t, 'shape', ()))}, not an empty result")


def _ng_model(ctx: Ctx, model: nn.Module) -> Any:
    from captum_normgrad import LayerNormGrad

    return LayerNormGrad(model, model[2]).attribute(ctx.x(), target=0)


def _same_as_unhooked(ctx: Ctx, fn: Callable[..., Any]) -> None:
    ref = fn(ctx, model=ctx.model())
    got = fn(ctx, model=_hooked(ctx))
    if not torch.allclose(got, ref, rtol=1e-5, atol=1e-7):
        raise Silent("a model carrying a full backward hook gives other results than without it")


def _hooked(ctx: Ctx) -> nn.Module:
    m = ctx.model()
    m.register_full_backward_hook(lambda mod, gi, go: None)
    return m


def _meta_x(ctx: Ctx) -> torch.Tensor:
    return torch.empty(2, 3, 8, 8, device="meta")


def _cplx_x(ctx: Ctx) -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, dtype=torch.complex64)


def _nan_x(ctx: Ctx) -> torch.Tensor:
    x = ctx.x()
    x[0, 0, 0, 0] = float("nan")
    return x


def _odd_bn_lambda(ctx: Ctx) -> None:
    from captum_normgrad import LayerNormGrad

    m = ctx.model(bn=True).train()
    before = _state(m)
    LayerNormGrad(lambda z: m(z), m[3]).attribute(ctx.x(4), target=0)
    why = _same_state(before, _state(m))
    if why:
        raise Silent(f"model changed through a lambda forward: {why}")


def _odd_model_unchanged_after_error(ctx: Ctx) -> None:
    from captum_normgrad import LayerNormGrad

    m = ctx.model(bn=True).train()
    before = _state(m)
    try:
        LayerNormGrad(m, m[3]).attribute(ctx.x(4), target=99)
    except Exception:
        pass
    why = _same_state(before, _state(m))
    if why:
        raise Silent(f"model changed by a failing call: {why}")


def _odd_signed_order1_vs_order0(ctx: Ctx) -> None:
    """Order 1 with a signed aggregation at epsilon=0 equals order 0 (a negated delta would flip it)."""
    from captum_normgrad import LayerNormGrad, LayerNormGradOrder1, per_sample_cross_entropy

    m = ctx.model()
    x = ctx.x()
    for agg in ("sum", "max"):
        # order 1 uses the loss: compare with order 0 on the same (per-sample cross-entropy) objective
        a0 = LayerNormGrad(m, m[2]).attribute(x, target=0, aggregation=agg, loss_fn=per_sample_cross_entropy)
        a1 = LayerNormGradOrder1(m, m[2]).attribute(x, target=0, aggregation=agg, epsilon=0.0)
        if not torch.allclose(a0, a1, rtol=1e-4, atol=1e-6):
            raise Silent(f"order 1 at epsilon=0 differs from order 0 with aggregation={agg!r}")


def _odd_16bit_png(ctx: Ctx) -> None:
    from PIL import Image

    from captum_normgrad.io import load_image

    p = ctx.fresh("png16") / "gray16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(p)  # mid-grey, 16 bit
    v = np.asarray(load_image(p)).astype(float)
    if abs(v.mean() - 128) > 2:
        raise Silent(f"a mid-grey 16-bit PNG reads as {v.mean():.1f}/255 (expected ~128)")


def _odd_explain_files_mode(ctx: Ctx) -> None:
    from captum_normgrad.explain import explain_files
    from captum_normgrad.io import find_images, make_preprocess, LoadedModel

    m = ctx.model().train()
    t, mean, std = make_preprocess(None, 16)
    loaded = LoadedModel(m, t, mean, std)
    before = _state(m)
    with contextlib.redirect_stderr(io.StringIO()):
        explain_files(find_images([ctx.image]), loaded, {"2": m[2]}, ["normgrad"], ctx.fresh("ef") / "out",
                      progress=False, formats=("npy",))
    why = _same_state(before, _state(m))
    if why:
        raise Silent(f"explain_files: {why}")


def _boost_nan(ctx: Ctx) -> Any:
    from captum_normgrad import InputSpaceSaliency, ParameterSaliency

    m = ctx.model()
    x, y = ctx.x(4), torch.tensor([0, 1, 2, 0])
    ps = ParameterSaliency(m).fit([(x, y)], progress=False)
    return InputSpaceSaliency(ps).attribute(x[:2], target=y[:2], boost=float("nan"))


def _swapped_activation(ctx: Ctx) -> None:
    from captum_normgrad import ParameterSaliency

    m = ctx.model()
    ps = ParameterSaliency(m, mode="naive")
    m[1] = nn.Tanh()  # the user edits the model after building the explainer
    x, y = ctx.x(), torch.tensor([0, 1])
    ref = ParameterSaliency(m, mode="naive").profiles(x, y)  # a fresh explainer on the edited model
    if not torch.allclose(ps.profiles(x, y), ref, rtol=1e-5, atol=1e-8):
        raise Silent("ParameterSaliency kept the module structure of construction time (swapped activation ignored)")


def _syspath_first(ctx: Ctx) -> None:
    from captum_normgrad.io import import_callable

    before = list(sys.path)
    here = os.getcwd()
    cwd = ctx.fresh("cwd").resolve()
    os.chdir(cwd)
    try:
        import_callable("json:dumps")
        after = list(sys.path)
    finally:
        os.chdir(here)
        sys.path[:] = before
    if after and Path(after[0]).resolve() == cwd and (not before or Path(before[0]).resolve() != cwd):
        raise Silent("the working folder was put first on sys.path: a local folder named like a dependency shadows it")


def _pg(ctx: Ctx, tol: float = 15, maps: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None) -> Any:
    from captum_normgrad import pointing_game

    mp = torch.rand(2, 1, 8, 8) if maps is None else maps
    mk = torch.zeros(2, 16, 16, dtype=torch.bool) if masks is None else masks
    if masks is None:
        mk[:, 2:5, 2:5] = True
    return pointing_game(mp, mk, tolerance=tol)


def _nanmaps() -> torch.Tensor:
    m = torch.rand(2, 1, 8, 8)
    m[0, 0, 0, 0] = float("nan")
    return m


def api_cases() -> List[Case]:
    from captum_normgrad import fuse_maps, normalize_maps

    c: List[Case] = []
    a = lambda name, fn, pat, **k: c.append(Case("api", name, fn, pat, **k))  # noqa: E731
    # order 0
    a("order0: empty batch (empty maps or a clear refusal)", lambda t: _empty_ok(_ng(t, x=torch.rand(0, 3, 8, 8))), r"empty|batch|N ?>= ?1|no (input|sample)", odd=True, source="15")
    a("order0: bool tensor target", lambda t: _ng(t, target=torch.tensor([True, False])), r"bool", source="15")
    a("order0: target out of range", lambda t: _ng(t, target=99), r"target|class|range")
    a("order0: target of wrong length", lambda t: _ng(t, target=torch.tensor([0, 1, 2])), r"target")
    a("order0: float target", lambda t: _ng(t, target=torch.tensor([0.5, 1.0])), r"target|integer|int")
    a("order0: NaN in inputs", lambda t: _ng(t, x=_nan_x(t)), r"nan|finite")
    a("order0: meta tensor", lambda t: _ng(t, x=_meta_x(t)), r"meta", source="15")
    a("order0: complex tensor", lambda t: _ng(t, x=_cplx_x(t)), r"complex", source="15")
    a("order0: int inputs", lambda t: _ng(t, x=torch.ones(2, 3, 8, 8, dtype=torch.int64)), r"float|dtype|int")
    a("order0: list instead of tensor", lambda t: _ng(t, x=[[1.0, 2.0]]), r"tensor")
    a("order0: channel_dim=5 on a 4-D layer", lambda t: _ng(t, channel_dim=5), r"channel_dim", source="15")
    a("order0: channel_dim=-9", lambda t: _ng(t, channel_dim=-9), r"channel_dim", source="15")
    a("order0: unknown aggregation", lambda t: _ng(t, aggregation="median"), r"aggregation")
    a("order0: unknown virtual_layer", lambda t: _ng(t, virtual_layer="conv5x5"), r"virtual_layer")
    a("order0: layer not in the model", lambda t: __import__("captum_normgrad").LayerNormGrad(t.model(), nn.Conv2d(3, 3, 1)).attribute(t.x(), target=0), r"layer")
    a("order0: full backward hook on the model (same maps, or a clear refusal)", lambda t: _same_as_unhooked(t, _ng_model), r"hook", odd=True, source="15")
    a("order0: BatchNorm model in train mode via a lambda (state kept)", _odd_bn_lambda, r"train|lambda", odd=True, source="15")
    a("order0: model state after a failing call", _odd_model_unchanged_after_error, r"target", odd=True)
    # order 1
    a("order1: empty batch (empty maps or a clear refusal)", lambda t: _empty_ok(_ng1(t, x=torch.rand(0, 3, 8, 8))), r"empty|batch|N ?>= ?1|no (input|sample)", odd=True, source="15")
    a("order1: bool tensor target", lambda t: _ng1(t, target=torch.tensor([True, False])), r"bool", source="15")
    a("order1: meta tensor", lambda t: _ng1(t, x=_meta_x(t)), r"meta", source="15")
    a("order1: complex tensor", lambda t: _ng1(t, x=_cplx_x(t)), r"complex", source="15")
    a("order1: full backward hook on the model (same maps, or a clear refusal)", lambda t: _same_as_unhooked(t, _ng1), r"hook", odd=True, source="15")
    a("order1: channel_dim=5", lambda t: _ng1(t, channel_dim=5), r"channel_dim", source="15")
    a("order1: NaN epsilon", lambda t: _ng1(t, epsilon=float("nan")), r"epsilon")
    a("order1: unknown hessian", lambda t: _ng1(t, hessian="magic"), r"hessian")
    a("order1: target out of range", lambda t: _ng1(t, target=99), r"target|class|range")
    a("order1: signed aggregation at epsilon=0 equals order 0", _odd_signed_order1_vs_order0, r"epsilon", odd=True, source="15")
    # parameter saliency
    a("saliency: full backward hook on the model (same profiles, or a clear refusal)", lambda t: _same_as_unhooked(t, _ps), r"hook", odd=True, source="15")
    a("saliency: empty batch (empty profiles or a clear refusal)", lambda t: _empty_ok(_ps(t, x=torch.rand(0, 3, 8, 8), target=torch.zeros(0, dtype=torch.long))), r"empty|batch|N ?>= ?1", odd=True, source="15")
    a("saliency: targets of wrong length", lambda t: _ps(t, target=torch.tensor([0, 1, 2])), r"target")
    a("saliency: NaN in inputs", lambda t: _ps(t, x=_nan_x(t)), r"nan|finite")
    a("saliency: InputSpaceSaliency boost=NaN", _boost_nan, r"boost", source="15")
    a("saliency: activation swapped after construction is used", _swapped_activation, r"module|activation", odd=True, source="15")
    a("io: a module:callable spec does not put the working folder first on sys.path", _syspath_first, r"path", odd=True, source="15")
    # maps and metrics
    a("maps: normalize_maps with NaN", lambda t: normalize_maps(_nanmaps()), r"nan|finite", source="15")
    a("maps: fuse_maps with NaN", lambda t: fuse_maps([_nanmaps(), torch.rand(2, 1, 4, 4)]), r"nan|finite", source="15")
    a("maps: fuse_maps NaN weight", lambda t: fuse_maps([torch.rand(2, 1, 8, 8)] * 2, mode="mean", weights=[1, float("nan")]), r"weight")
    a("maps: fuse_maps of nothing", lambda t: fuse_maps([]), r"at least one|empty")
    a("maps: fuse_maps unknown mode", lambda t: fuse_maps([torch.rand(2, 1, 8, 8)], mode="max"), r"mode")
    a("maps: fuse_maps batch mismatch", lambda t: fuse_maps([torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8)]), r"shape|N=")
    a("metrics: pointing_game tolerance=NaN", lambda t: _pg(t, tol=float("nan")), r"tolerance", source="15")
    a("metrics: pointing_game tolerance<0", lambda t: _pg(t, tol=-1), r"tolerance")
    a("metrics: pointing_game NaN maps", lambda t: _pg(t, maps=_nanmaps()), r"nan|finite")
    a("metrics: pointing_game empty mask", lambda t: _pg(t, masks=torch.zeros(2, 16, 16, dtype=torch.bool)), r"empty")
    a("metrics: pointing_game batch mismatch", lambda t: _pg(t, masks=torch.ones(3, 16, 16, dtype=torch.bool)), r"batch|masks")
    a("metrics: pointing_game masks not binary", lambda t: _pg(t, masks=torch.full((2, 16, 16), 0.5)), r"boolean|0 and 1|binary")
    # files
    a("io: 16-bit PNG read correctly (or refused)", _odd_16bit_png, r"16|mode|bit", odd=True, source="15")
    a("io: explain_files keeps the caller's training mode", _odd_explain_files_mode, r"mode", odd=True, source="15")
    return c


# ------------------------------------------------------------------------------------ CLI cases
def _cli(argv: List[str], cwd: Path) -> subprocess.CompletedProcess:
    """The console script in a subprocess (what a user runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "captum_normgrad.cli", *argv], capture_output=True, text=True,
                          cwd=str(cwd), env=env, timeout=300)


class CliError(Exception):
    """A non-zero exit of the CLI: ``str()`` is its stderr."""

    def __init__(self, rc: int, stderr: str) -> None:
        super().__init__(stderr)
        self.rc = rc
        self.stderr = stderr


def _explain(ctx: Ctx, *extra: str, images: Optional[List[str]] = None, out: Optional[Path] = None) -> Path:
    folder = ctx.fresh("explain")
    out = out or folder / "out"
    argv = ["explain", *(images or [str(ctx.image)]), "--model", f"{ctx.factories}:tiny_cnn", "--layer", "2",
            "--out", str(out), "--image-size", "16", "--quiet", *extra]
    r = _cli(argv, folder)
    if r.returncode != 0:
        raise CliError(r.returncode, r.stderr)
    return out


def _odd_name_collision(ctx: Ctx) -> None:
    from PIL import Image

    folder = ctx.fresh("collide")
    for n in ("a.png", "a.jpg", "a-2.png"):
        Image.open(ctx.image).convert("RGB").save(folder / n)
    (folder / "sub").mkdir()
    Image.open(ctx.image).convert("RGB").save(folder / "sub" / "a.png")
    out = _explain(ctx, "--save", "npy", images=[str(folder / "a.png"), str(folder / "a.jpg"), str(folder / "a-2.png"),
                                                 str(folder / "sub" / "a.png")])
    maps = list(out.glob("*.npy"))
    if len(maps) != 4:
        raise Silent(f"4 images, {len(maps)} map files: outputs overwritten")


def _odd_symlink_index(ctx: Ctx) -> None:
    folder = ctx.fresh("symlink")
    out = folder / "out"
    out.mkdir()
    victim = folder / "victim.txt"
    victim.write_text("precious")
    (out / "index.json").symlink_to(victim)
    _explain(ctx, "--save", "npy", out=out)
    if victim.read_text() != "precious":
        raise Silent("explain wrote through out/index.json -> victim.txt")


def _odd_bomb(ctx: Ctx) -> None:
    from PIL import Image

    folder = ctx.fresh("bomb")
    Image.new("L", (20000, 12000)).save(folder / "bomb.png")  # 240 Mpx > PIL's bomb limit
    Image.open(ctx.image).save(folder / "fine.png")
    out = _explain(ctx, "--skip-unreadable", "--save", "npy", images=[str(folder / "bomb.png"), str(folder / "fine.png")])
    if len(list(out.glob("*.npy"))) != 1:
        raise Silent("expected the fine image explained and the bomb skipped")


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("unpickled!",))


def _pickled_weights(ctx: Ctx) -> Path:
    import pickle

    p = ctx.fresh("pickle") / "w.pt"
    p.write_bytes(pickle.dumps({"state": _Evil()}))
    return _explain(ctx, "--weights", str(p))


def cli_cases() -> List[Case]:
    c: List[Case] = []
    a = lambda name, fn, pat, **k: c.append(Case("cli", name, fn, pat, **k))  # noqa: E731
    a("explain: missing image file", lambda t: _explain(t, images=[str(t.root / "nope.png")]), r"nope\.png|no such")
    a("explain: not an image", lambda t: (t.root.joinpath("x.png").write_bytes(b"nope"), _explain(t, images=[str(t.root / "x.png")])), r"decode|image")
    a("explain: unknown model", lambda t: _raise_cli(_cli(["explain", str(t.image), "--model", "resnet5O", "--layer", "x", "--out", str(t.fresh("m") / "o")], t.root)), r"unknown model")
    a("explain: unknown layer", lambda t: _raise_cli(_cli(["explain", str(t.image), "--model", f"{t.factories}:tiny_cnn", "--layer", "9", "--out", str(t.fresh("l") / "o"), "--image-size", "16"], t.root)), r"layer")
    a("explain: missing weights file", lambda t: _explain(t, "--weights", str(t.root / "w.pt")), r"w\.pt|weights")
    a("explain: unknown method", lambda t: _explain(t, "--method", "normgard"), r"method|normgard")
    a("explain: image size 0", lambda t: _raise_cli(_cli(["explain", str(t.image), "--model", f"{t.factories}:tiny_cnn", "--layer", "2", "--out", str(t.fresh("s") / "o"), "--image-size", "0"], t.root)), r"image.size")
    a("explain: target out of range", lambda t: _explain(t, "--target", "99"), r"target|class")
    a("explain: colliding names get their own outputs", _odd_name_collision, r"name|collid", odd=True, source="15")
    a("explain: symlink in the output folder not written through", _odd_symlink_index, r"link", odd=True, source="15")
    a("explain: decompression bomb under --skip-unreadable", _odd_bomb, r"bomb|pixels|too large", odd=True, refusal_ok=False, source="15")
    a("explain: weights file refused by torch.load keeps the whole reason", _pickled_weights, r"arbitrary code", source="15")
    a("run: missing config", lambda t: _raise_cli(_cli(["run", str(t.root / "none.toml")], t.root)), r"none\.toml|not found")
    a("run: invalid TOML", lambda t: _raise_cli(_cli(["run", str(_write(t, "bad.toml", "x = = 1"))], t.root)), r"toml")
    a("run: unknown key", lambda t: _raise_cli(_cli(["run", str(_write(t, "k.json", json.dumps({**t.run_config(t.fresh('k')), 'batchsize': 3})))], t.root)), r"batchsize")
    a("run: mean of 2 values on RGB images", lambda t: _raise_cli(_cli(["run", str(_write(t, "mean.json", json.dumps(t.run_config(t.fresh("mean"), target="prediction", dataset={"kind": "folder", "root": str(t.imgs), "image_size": 12, "mean": [0.5, 0.5], "std": [0.5, 0.5]}))))], t.root)), r"mean|channel", source="15")
    return c


def _write(ctx: Ctx, name: str, text: str) -> Path:
    p = ctx.fresh(name) / name
    p.write_text(text)
    return p


def _raise_cli(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        raise CliError(r.returncode, r.stderr)
    return r


# ------------------------------------------------------------------------------------ runner cases
def _run(ctx: Ctx, name: str, **over: Any) -> Any:
    from captum_normgrad.runner import RunConfig, run

    return run(RunConfig.from_dict(ctx.run_config(ctx.fresh(name), **over)))


def _resume_checkpoint_swapped(ctx: Ctx) -> Any:
    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("ckpt")
    sys.path.insert(0, str(ctx.root))
    import importlib

    fac = importlib.import_module("factories")
    torch.save(fac.tiny_cnn().state_dict(), folder / "w.pt")
    cfg = ctx.run_config(folder, model={"source": "factory", "factory": f"{ctx.factories}:tiny_cnn", "checkpoint": str(folder / "w.pt")})
    run(RunConfig.from_dict(cfg))
    (folder / "out" / "shards" / "shard-00001.done.json").unlink()  # partial
    torch.save(fac.tiny_cnn_seed2().state_dict(), folder / "w.pt")  # weights B over the same file
    return run(RunConfig.from_dict(cfg))


def _resume_image_rewritten(ctx: Ctx) -> Any:
    from PIL import Image

    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("imgchg")
    shutil.copytree(ctx.imgs, folder / "imgs")
    cfg = ctx.run_config(folder, target="prediction", dataset={"kind": "folder", "root": str(folder / "imgs"), "image_size": 12})
    run(RunConfig.from_dict(cfg))
    p = folder / "imgs" / "1.png"
    st = p.stat()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return run(RunConfig.from_dict(cfg))


_HOLD = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def _concurrent(ctx: Ctx) -> Any:
    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("lock")
    (folder / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder / "out" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # type: ignore[union-attr]
        return run(RunConfig.from_dict(ctx.run_config(folder)))
    finally:
        holder.kill()
        holder.wait()


def _stale_lock(ctx: Ctx) -> None:
    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("stale")
    (folder / "out").mkdir()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (folder / "out" / ".lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "started": "x"}))
    rep = run(RunConfig.from_dict(ctx.run_config(folder)))
    if rep.samples_written != 6:
        raise Silent("a stale lock blocked the run or samples are missing")


def _lock_symlink(ctx: Ctx) -> Any:
    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("locklink")
    (folder / "out").mkdir()
    victim = folder / "victim.txt"
    victim.write_text("precious")
    (folder / "out" / ".lock").symlink_to(victim)
    try:
        return run(RunConfig.from_dict(ctx.run_config(folder)))
    finally:
        if victim.read_text() != "precious":
            raise Silent("the lock was written through a symlink")


def _all_fail_midrun(ctx: Ctx) -> Any:
    return _run(ctx, "allfail", dataset={"kind": "factory", "factory": f"{ctx.factories}:TinyDataset", "kwargs": {"n": 6, "bad": list(range(6))}})


def _non_square(ctx: Ctx) -> None:
    from PIL import Image

    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.engine import preprocessing

    cfg = RunConfig.from_dict(ctx.run_config(ctx.fresh("sq"), dataset={"kind": "folder", "root": str(ctx.imgs), "image_size": 16}))
    t, _ = preprocessing(cfg)
    ramp = np.tile(np.linspace(0, 255, 64)[None, :, None], (32, 1, 3)).astype(np.uint8)
    x = t(Image.fromarray(ramp))
    if float(x[0, 8, -1] - x[0, 8, 0]) > 0.75:  # squashed: the full ramp in 16 px; cropped: half of it
        raise Silent("a 2:1 image was squashed to a square")


def _no_norm_warning(ctx: Ctx) -> None:
    from captum_normgrad.runner import RunConfig
    from captum_normgrad.runner.engine import preprocessing

    cfg = RunConfig.from_dict({"layers": ["layer4"], "dataset": {"kind": "folder", "root": str(ctx.imgs), "image_size": 32},
                               "model": {"source": "torchvision", "name": "resnet18"}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        preprocessing(cfg)
    if not any("normalis" in str(x.message) for x in w):
        raise Silent("a torchvision model fed un-normalised images without a warning")


def _runner_symlinks(ctx: Ctx) -> None:
    from captum_normgrad.runner import RunConfig, run

    folder = ctx.fresh("rlinks")
    cfg = RunConfig.from_dict(ctx.run_config(folder))
    run(cfg)
    victim = folder / "victim.txt"
    victim.write_text("precious")
    for name in ("index.json", "report.json"):
        (folder / "out" / name).unlink()
        (folder / "out" / name).symlink_to(victim)
    run(RunConfig.from_dict(ctx.run_config(folder)))
    if victim.read_text() != "precious":
        raise Silent("the runner wrote through a symlink in its output folder")


def runner_cases() -> List[Case]:
    c: List[Case] = []
    a = lambda name, fn, pat, **k: c.append(Case("runner", name, fn, pat, **k))  # noqa: E731
    fac = lambda t: f"{t.factories}"  # noqa: E731
    a("mean=[0.5, 0.5] on RGB images", lambda t: _run(t, "mean", target="prediction", dataset={"kind": "folder", "root": str(t.imgs), "image_size": 12, "mean": [0.5, 0.5], "std": [0.5, 0.5]}), r"mean|channel", source="15")
    a("mean and std of different lengths", lambda t: _run(t, "ms", dataset={"kind": "folder", "root": str(t.imgs), "mean": [0.5] * 3, "std": [0.5] * 2}), r"mean|std")
    a("std = 0", lambda t: _run(t, "std0", dataset={"kind": "folder", "root": str(t.imgs), "mean": [0.5] * 3, "std": [0, 1, 1]}), r"std")
    a("mean with NaN", lambda t: _run(t, "meannan", dataset={"kind": "folder", "root": str(t.imgs), "mean": [float("nan"), 0, 0], "std": [1, 1, 1]}), r"mean|finite")
    a("every sample unreadable", _all_fail_midrun, r"sample|read", source="15")
    a("resume after the checkpoint was replaced", _resume_checkpoint_swapped, r"checkpoint", source="15")
    a("resume after an image was rewritten", _resume_image_rewritten, r"1\.png|image", source="15")
    a("a second run on a locked folder", _concurrent, r"in use|lock", source="15")
    a("a stale lock of a dead pid", _stale_lock, r"lock", odd=True, source="15")
    a("the lock file is a symlink", _lock_symlink, r"link", source="15")
    a("non-square images are not squashed", _non_square, r"square|crop", odd=True, source="13")
    a("torchvision model without normalisation warns", _no_norm_warning, r"normalis", odd=True, source="13")
    a("output is a file", lambda t: (lambda f: (f.joinpath("o").write_text("x"), _run(t, "of", output=str(f / "o"))))(t.fresh("of")), r"not a folder")
    a("output folder holds foreign files", lambda t: (lambda f: ((f / "o").mkdir(), (f / "o" / "a.txt").write_text("x"), _run(t, "ff", output=str(f / "o"))))(t.fresh("ff")), r"not empty|runner output")
    a("unknown layer", lambda t: _run(t, "layer", layers=["9x"]), r"layer|9x")
    a("unknown method", lambda t: _run(t, "meth", methods=["normgard"]), r"method")
    a("batch_size 0", lambda t: _run(t, "bs", batch_size=0), r"batch_size")
    a("shard_size -1", lambda t: _run(t, "ss", shard_size=-1), r"shard_size")
    a("target 'best'", lambda t: _run(t, "tg", target="best"), r"target")
    a("device 'tpu'", lambda t: _run(t, "dev", device="tpu"), r"device")
    a("dataset limit 0", lambda t: _run(t, "lim", dataset={"kind": "factory", "factory": f"{fac(t)}:TinyDataset", "limit": 0}), r"limit")
    a("missing factory file", lambda t: _run(t, "fact", model={"source": "factory", "factory": str(t.root / "none.py") + ":f"}), r"none\.py|no such")
    a("empty image folder", lambda t: (lambda f: ((f / "e").mkdir(), _run(t, "empty", dataset={"kind": "folder", "root": str(f / "e")})))(t.fresh("e")), r"no images")
    a("1-channel images for a 3-channel model", lambda t: _run(t, "ch", target="prediction", dataset={"kind": "torchvision", "name": "FakeData", "kwargs": {"size": 4, "image_size": [1, 12, 12], "num_classes": 3}}), r"model cannot take|channel|shape")
    a("map_dtype 'int8'", lambda t: _run(t, "md", map_dtype="int8"), r"map_dtype")
    a("no method and no statistics", lambda t: _run(t, "nm", methods=[]), r"nothing to compute")
    a("symlinks in the output folder not written through", _runner_symlinks, r"link", odd=True, source="15")
    a("on_change 'maybe'", lambda t: _run(t, "oc", on_change="maybe"), r"on_change")
    a("fingerprint 'md5'", lambda t: _run(t, "fp", fingerprint="md5"), r"fingerprint")
    return c


# ------------------------------------------------------------------------------------ classify
PACKAGE_DIR = str(ROOT / "captum_normgrad")


def _origin(e: BaseException) -> Optional[str]:
    """Where an exception was raised when that is not the package itself (torch, PIL, ...), else None.

    A message the package raised itself (``raise ValueError(...)`` in captum_normgrad, or a
    re-raise ``from None``) is one it wrote for the user; a message from deep inside a dependency
    is not, even when it happens to name the problem.
    """
    import captum_normgrad

    pkg = str(Path(captum_normgrad.__file__).resolve().parent)
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if last is None or str(Path(last).resolve()).startswith(pkg) or Path(last).resolve() == Path(__file__).resolve():
        return None
    parts = Path(last).parts
    for marker in ("site-packages", "dist-packages", "lib"):
        if marker in parts:
            i = len(parts) - 1 - parts[::-1].index(marker)
            return "/".join(parts[i + 1 : i + 3])
    return Path(last).name


def classify(case: Case, ctx: Ctx) -> Result:
    t0 = time.perf_counter()
    pat = re.compile(case.pattern, re.I)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                case.fn(ctx)
    except Silent as e:
        return Result(case.area, case.name, "silent", str(e), time.perf_counter() - t0, case.source)
    except CliError as e:
        lines = [ln for ln in e.stderr.strip().splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        msg = errs[-1] if errs else (lines[-1] if lines else "")
        if "Traceback" in e.stderr:
            verdict, why = "unclear", "traceback: " + msg
        elif "CAPTUM_NORMGRAD_DEBUG" in msg:
            verdict, why = "unclear", "an unexpected exception reported by the catch-all handler: " + msg
        elif case.odd and not case.refusal_ok:
            verdict, why = "unclear", "refused an input it should handle: " + msg
        elif len(errs) != 1:
            verdict, why = "unclear", f"{len(errs)} error lines: " + " | ".join(lines[-2:])
        elif not pat.search(msg):
            verdict, why = "unclear", "does not name the problem: " + msg
        else:
            verdict, why = "clear", msg
        return Result(case.area, case.name, verdict, f"exit {e.rc}: {why}"[:300], time.perf_counter() - t0, case.source)
    except BaseException as e:  # noqa: BLE001 - every outcome is classified
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).strip()
        one = " ".join(msg.split())
        name = type(e).__name__
        origin = _origin(e)
        if case.odd and not case.refusal_ok:
            verdict, why = "unclear", f"refused an input it should handle: {name}: {one}"
        elif isinstance(e, INTERNAL) or not isinstance(e, EXPECTED):
            verdict, why = "unclear", f"internal error {name}: {one}"
        elif origin is not None:
            verdict, why = "unclear", f"raised inside {origin}, not by the package: {name}: {one}"
        elif "\n" in msg and len(msg.splitlines()) > 1:
            verdict, why = "unclear", f"{len(msg.splitlines())}-line message {name}: {one}"
        elif not pat.search(one):
            verdict, why = "unclear", f"does not name the problem: {name}: {one}"
        else:
            verdict, why = "clear", f"{name}: {one}"
        return Result(case.area, case.name, verdict, why[:300], time.perf_counter() - t0, case.source)
    if case.odd:
        return Result(case.area, case.name, "ok", "handled correctly", time.perf_counter() - t0, case.source)
    return Result(case.area, case.name, "silent", "no error on a bad input", time.perf_counter() - t0, case.source)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--area", choices=("api", "cli", "runner"), action="append", help="only these areas (repeatable)")
    p.add_argument("-k", default=None, help="only cases whose name contains this text")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--fail-on-silent", action="store_true", help="exit 1 when a case is silent")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cases = [c for f in (api_cases, cli_cases, runner_cases) for c in f()]
    if args.area:
        cases = [c for c in cases if c.area in args.area]
    if args.k:
        cases = [c for c in cases if args.k.lower() in c.name.lower()]
    from tqdm.auto import tqdm

    results: List[Result] = []
    with tempfile.TemporaryDirectory(prefix="cn-audit-") as tmp:
        ctx = Ctx(Path(tmp))
        for case in tqdm(cases, desc="audit", unit="case", file=sys.stderr):
            results.append(classify(case, ctx))
    counts = {v: sum(r.verdict == v for r in results) for v in ("clear", "unclear", "silent", "ok")}
    w = max(len(f"{r.area}: {r.name}") for r in results)
    print(f"{'case':<{w}}  {'verdict':<8} {'sec':>5}  detail")
    for r in results:
        print(f"{r.area + ': ' + r.name:<{w}}  {r.verdict:<8} {r.seconds:5.1f}  {r.detail[:160]}")
    bad = sum(1 for r in results)
    print()
    print(f"tried {bad}: clear error {counts['clear']}, unclear error {counts['unclear']}, silent {counts['silent']}, "
          f"handled correctly (odd inputs) {counts['ok']}")
    for area in ("api", "cli", "runner"):
        rs = [r for r in results if r.area == area]
        if rs:
            print(f"  {area}: tried {len(rs)}, " + ", ".join(f"{v} {sum(r.verdict == v for r in rs)}" for v in ("clear", "unclear", "silent", "ok")))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {"tried": len(results), **counts},
                                               "results": [asdict(r) for r in results]}, indent=1))
    return 1 if (args.fail_on_silent and counts["silent"]) else 0


if __name__ == "__main__":
    sys.exit(main())
