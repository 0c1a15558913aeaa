"""One method registry: every name means one thing in the Python API, ``explain`` and ``run``.

For every name of :data:`captum_normgrad.registry.METHODS`, the maps of ``explain``
(:func:`compute_maps` and the ``.npy`` files of :func:`explain_files`) and of the dataset runner
(``run``, one process) are compared **bit for bit** with a direct call of the class written out
here (the table :data:`DIRECT` is the independent statement of what each name computes), on the
same images, in the same batch.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation
from PIL import Image
from torch import nn

from captum_normgrad import LayerNormGrad, LayerNormGradOrder1
from captum_normgrad.registry import ALIASES, METHODS, get_method

torch.set_num_threads(1)

N, SIZE, CLASSES, TARGET = 4, 12, 3, 1
LAYERS = ["0", "2"]

MODEL_FILE = '''
import torch
from torch import nn


def build():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()
'''


def _per_layer(cls: type, **kw: Any) -> Callable[[nn.Module, List[nn.Module], torch.Tensor, torch.Tensor], List[torch.Tensor]]:
    return lambda m, layers, x, t: [cls(m, layer).attribute(x, target=t, **kw).detach() for layer in layers]


def _multi(cls: type, **kw: Any) -> Callable[[nn.Module, List[nn.Module], torch.Tensor, torch.Tensor], List[torch.Tensor]]:
    return lambda m, layers, x, t: [r.detach() for r in cls(m, layers).attribute(x, target=t, **kw)]


#: what each name computes, written out as a direct call of the classes (independent of the registry)
DIRECT = {
    "normgrad": _multi(LayerNormGrad),
    "normgrad_selective": _multi(LayerNormGrad, virtual_layer="scaling", aggregation="filter_norm"),
    "normgrad_weights": _multi(LayerNormGrad, virtual_layer="weights"),
    "normgrad_order1": _multi(LayerNormGradOrder1),
    "normgrad_order1_adversarial": _multi(LayerNormGradOrder1, adversarial=True),
    "normgrad_lookahead": _multi(LayerNormGradOrder1, hessian="none"),
    "gradcam": _per_layer(LayerGradCam),
    "gradcam_relu": _per_layer(LayerGradCam, relu_attributions=True),
    "gradxact": _per_layer(LayerGradientXActivation),
    "gradxact_sum": _multi(LayerNormGrad, virtual_layer="scaling", aggregation="sum"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("registry")
    (root / "regmodel.py").write_text(MODEL_FILE)
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(imgs / f"im{i}.png")
    from torchvision.transforms import functional as TF

    x = torch.stack([TF.to_tensor(Image.open(imgs / f"im{i}.png").convert("RGB")) for i in range(N)])
    ns: Dict[str, Any] = {}
    exec(MODEL_FILE, ns)
    return {"root": root, "imgs": imgs, "x": x, "model": ns["build"]()}


def _direct(setup: Dict[str, Any], name: str) -> List[torch.Tensor]:
    model = setup["model"]
    layers = [dict(model.named_modules())[n] for n in LAYERS]
    return DIRECT[name](model, layers, setup["x"], torch.full((N,), TARGET))


def test_the_table_covers_every_name() -> None:
    assert set(DIRECT) == set(METHODS)
    for name, e in METHODS.items():
        assert e.summary and e.formula and e.label and ":" in e.factory, name
        assert e.order in (0, 1) and isinstance(e.multi_layer, bool)


def test_every_name_is_identical_in_api_explain_and_run(setup: Dict[str, Any]) -> None:
    from captum_normgrad.explain import compute_maps, explain_files
    from captum_normgrad.io import LoadedModel, find_images
    from captum_normgrad.runner import RunOutput, load_config, run
    from torchvision.transforms import ToTensor

    root, model, x = setup["root"], setup["model"], setup["x"]
    layers = [dict(model.named_modules())[n] for n in LAYERS]
    direct = {name: _direct(setup, name) for name in METHODS}
    one_channel = [n for n, e in METHODS.items() if not e.per_channel]
    assert set(one_channel) == set(METHODS) - {"gradxact"}

    # explain, in memory
    for name in one_channel:
        got = compute_maps(name, model, layers, x, torch.full((N,), TARGET))
        for g, d in zip(got, direct[name]):
            assert torch.equal(g, d), name
    # explain, files
    loaded = LoadedModel(model, ToTensor(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, "regmodel")
    layer_map = dict(zip(LAYERS, layers))
    out = root / "explain"
    explain_files(find_images([setup["imgs"]]), loaded, layer_map, one_channel, out, target=TARGET,
                  batch_size=N, formats=("npy",), progress=False)
    rows = json.loads((out / "index.json").read_text())["images"]
    assert [r["name"] for r in rows] == [f"im{i}" for i in range(N)]
    for name in one_channel:
        for k, ln in enumerate(LAYERS):
            for i in range(N):
                saved = np.load(out / f"im{i}__{name}__{ln}.npy")
                assert np.array_equal(saved, direct[name][k][i, 0].numpy()), (name, ln, i)
    # run, one process
    cfg = {
        "output": str(root / "run"), "batch_size": N, "shard_size": N, "layers": LAYERS,
        "methods": list(METHODS), "threads": 1, "progress": False, "target": TARGET, "map_dtype": "float32",
        "dataset": {"kind": "folder", "root": str(setup["imgs"])},
        "model": {"source": "factory", "factory": f"{root / 'regmodel.py'}:build"},
        "statistics": {"parameter_saliency": False},
    }
    (root / "run.json").write_text(json.dumps(cfg))
    run(load_config(root / "run.json"))
    res = RunOutput(root / "run")
    for name in METHODS:
        for k, ln in enumerate(LAYERS):
            idx, maps = res.maps(f"{name}/{ln}")
            assert idx.tolist() == list(range(N))
            assert torch.equal(maps, direct[name][k]), (name, ln)


def test_meanings_against_the_formulas(setup: Dict[str, Any]) -> None:
    """The variants differ as their names say (not only as the table says)."""
    gc, gcr = _direct(setup, "gradcam"), _direct(setup, "gradcam_relu")
    gxa, gxs = _direct(setup, "gradxact"), _direct(setup, "gradxact_sum")
    for a, b in zip(gc, gcr):
        assert (a < 0).any(), "the test needs a signed Grad-CAM map"
        torch.testing.assert_close(F.relu(a), b)
    for a, b in zip(gxa, gxs):
        assert a.shape[1] > 1 and b.shape[1] == 1
        torch.testing.assert_close(a.sum(1, keepdim=True), b, rtol=1e-5, atol=1e-7)


def test_aliases_are_deprecated_and_map_to_the_same_entry() -> None:
    for old, new in ALIASES.items():
        with pytest.warns(FutureWarning, match=f"use '{new}'"):
            assert get_method(old) is METHODS[new]
    with pytest.raises(ValueError, match=r"unknown method 'normgrad_selectiv'.*did you mean normgrad_selective"):
        get_method("normgrad_selectiv")


def test_explain_refuses_per_channel_maps_with_the_fix(setup: Dict[str, Any]) -> None:
    from captum_normgrad.explain import compute_maps
    from captum_normgrad.io import CLIInputError

    model = setup["model"]
    with pytest.raises(CLIInputError, match="one map per channel.*use 'gradxact_sum'"):
        compute_maps("gradxact", model, [model[2]], setup["x"], torch.full((N,), TARGET))


def test_front_ends_define_no_methods_of_their_own() -> None:
    from captum_normgrad import explain
    from captum_normgrad.runner import BUILTIN_METHODS

    assert explain.METHODS is METHODS and BUILTIN_METHODS is METHODS
    from captum_normgrad.demo import DEMO_METHODS

    assert all(m in METHODS for m, _ in DEMO_METHODS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [m for m in explain.method_names()] == [n for n in METHODS if n != "gradxact"]
