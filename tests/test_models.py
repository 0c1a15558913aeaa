"""Tests of the benchmark models (captum_normgrad.models) and their committed weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_normgrad.datasets import NUM_CLASSES, ShapesDataset
from captum_normgrad.models import (
    BENCHMARK_MODELS,
    ShapesResNet,
    ShapesVGG,
    benchmark_layers,
    build_benchmark_model,
    load_benchmark_model,
    torchvision_model,
    weights_path,
)

ROOT = Path(__file__).resolve().parents[1]

# block output resolutions on 64 x 64 inputs
EXPECTED_BLOCK_SIZES = {"vgg": [64, 32, 16, 8], "resnet": [32, 16, 8, 4]}


@pytest.fixture(scope="module")
def fresh_test_split():
    # a seed used neither for training (0) nor for the reported test split (2)
    images, labels, _ = ShapesDataset(300, seed=123).tensors()
    return images, labels


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_committed_weights_reach_95_percent(name, fresh_test_split):
    images, labels = fresh_test_split
    model = load_benchmark_model(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item()
    assert acc >= 0.95, f"{name}: {acc:.3f}"


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_results_describe_the_committed_weights(name):
    results = json.loads((ROOT / "benchmarks" / "results" / "train_models.json").read_text())
    (entry,) = [r for r in results["models"] if r["model"] == name]
    assert entry["weights_sha256"] == hashlib.sha256(weights_path(name).read_bytes()).hexdigest()
    assert entry["test_accuracy"] >= 0.95
    assert weights_path(name).stat().st_size < 2 * 1024 * 1024


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
def test_blocks_and_shapes(name):
    torch.manual_seed(0)
    model = load_benchmark_model(name, weights=None)
    layers = benchmark_layers(model)
    assert list(layers) == ["block1", "block2", "block3", "block4"]
    modules = dict(model.named_modules())
    assert [modules[n] for n in model.block_names] == list(layers.values())
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, o.shape)) for k, m in layers.items()]
    try:
        out = model(torch.rand(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, NUM_CLASSES)
    assert [seen[k][-1] for k in layers] == EXPECTED_BLOCK_SIZES[name]


def test_vgg_names_follow_torchvision_style():
    model = ShapesVGG()
    assert model.block_names == ["features.5", "features.12", "features.19", "features.26"]
    for n in model.block_names:
        assert isinstance(dict(model.named_modules())[n], nn.ReLU)
    assert isinstance(ShapesResNet().layer4, nn.Module)


def test_load_from_path_roundtrip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = build_benchmark_model("vgg", widths=(4, 8, 8, 8))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"arch": "vgg", "config": json.dumps(model.config)})
    loaded = load_benchmark_model("vgg", weights=path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(ValueError, match="'vgg' model, not 'resnet'"):
        load_benchmark_model("resnet", weights=path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark model"):
        load_benchmark_model("alexnet")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_benchmark_model("vgg", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="widths"):
        ShapesVGG(widths=(8, 8))
    with pytest.raises(TypeError, match="block_names"):
        benchmark_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown model .not_a_model.: give a torchvision classification model name"):
        torchvision_model("not_a_model")


def test_torchvision_model_random_init():
    model = torchvision_model("resnet18")
    assert isinstance(model, nn.Module) and not model.training
    assert isinstance(dict(model.named_modules())["layer4"], nn.Module)
