"""The one layer lookup, layer suggestions for every torchvision classifier, and ViT/Swin layers in ``explain``.

References are independent: hooks and ``torch.autograd.grad`` written here, not the package's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from captum_normgrad import cli
from captum_normgrad._layers import UnknownLayerError, get_layer, get_layers, layout_of, suggest_layers
from captum_normgrad.explain import compute_maps, detect_layouts
from captum_normgrad.io import CLIInputError
from captum_normgrad.io import get_layer as io_get_layer

torch.set_num_threads(1)


# --------------------------------------------------------------------------- lookup


def test_lookup_did_you_mean_aliases_and_data_parallel() -> None:
    from captum_normgrad.models import build_benchmark_model
    from captum_normgrad.runner.resolve import resolve_layers

    torch.manual_seed(0)
    model = build_benchmark_model("resnet")
    assert get_layer(model, "block2") is model.layer2  # benchmark alias
    assert get_layer(model, "layer3.conv1") is model.layer3.conv1
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'layr3' \(did you mean layer3"):
        get_layer(model, "layr3")
    with pytest.raises(CLIInputError, match="did you mean"):  # the command line's error class
        io_get_layer(model, "layr3")
    dp = nn.DataParallel(model)
    assert get_layer(dp, "layer2") is model.layer2 and get_layer(dp, "module.layer2") is model.layer2
    assert get_layer(dp, "block4") is model.layer4
    assert resolve_layers(dp, ["block1", "module.layer3"]) == [model.layer1, model.layer3]
    assert get_layers(model, ["layer1", "block4"]) == [model.layer1, model.layer4]
    with pytest.raises(TypeError, match="must be a str"):
        get_layer(model, 3)  # type: ignore[arg-type]


def test_layouts_from_shapes() -> None:
    assert layout_of((2, 64, 56, 56), (224, 224)) == ("channels_first", (56, 56))
    assert layout_of((2, 56, 56, 96), (224, 224)) == ("channels_last", (56, 56))
    assert layout_of((2, 197, 768), (224, 224)) == ("tokens", (14, 14))  # class token + 14 x 14 patches
    assert layout_of((2, 49, 768), (224, 224)) == ("tokens", (7, 7))
    assert layout_of((2, 1000), (224, 224)) is None


# --------------------------------------------------------------------------- suggestions, every architecture


def _live_head(model: nn.Module) -> nn.Module:
    """Random weights for zero-initialised linear layers (torchvision's ViT head starts at zero, so
    every gradient, hence every map, of an untrained ViT is exactly zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model


def _size_and_kwargs(name: str) -> Tuple[int, Dict[str, Any]]:
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return 2 * patch, {"image_size": 2 * patch}  # a 2 x 2 patch grid
    if name == "inception_v3":
        return 299, {"aux_logits": False, "init_weights": False}
    if name == "googlenet":
        return 64, {"aux_logits": False, "init_weights": False}
    if name.startswith("maxvit"):
        return 224, {}
    return 64, {}


#: what the rule must find for families where the answer is well known
EXPECTED = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "vgg16": ["features.8", "features.15", "features.22", "features.29"],  # the last ReLU of blocks 2-5
    "swin_t": ["features.1", "features.3", "features.5", "permute"],
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 7, 10)],  # not 11: see suggest_layers
    "convnext_tiny": ["features.1", "features.3", "features.5", "features"],
    "maxvit_t": ["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
}

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)


def _is_big(name: str) -> bool:
    return any(k in name for k in ("128gf", "32gf", "16gf", "vit_h", "vit_l", "large", "_b7", "_b6", "v2_l", "v2_m"))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_suggested_layers_are_reachable_and_give_finite_maps(name: str) -> None:
    from captum_normgrad import LayerNormGrad

    size, kwargs = _size_and_kwargs(name)
    torch.manual_seed(0)
    model = _live_head(torchvision.models.get_model(name, **kwargs).eval())
    names = suggest_layers(model, size)
    assert 2 <= len(names) <= 4, names
    if name in EXPECTED:
        assert names == EXPECTED[name]
    layers = get_layers(model, names)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    layouts = detect_layouts(model, layers, x)
    grids = [g for _, g in layouts]
    # shallow to deep: the grids never grow
    assert all(a[0] * a[1] >= b[0] * b[1] for a, b in zip(grids, grids[1:])), grids
    with torch.no_grad():
        target = model(x).argmax(1)  # the predicted class: a live output even for a random SqueezeNet
    maps = compute_maps("normgrad", model, layers, x, target, layouts=layouts)
    for n, m, g in zip(names, maps, grids):
        assert m.shape == (1, 1, *g) and torch.isfinite(m).all() and m.abs().sum() > 0, n
    del model, LayerNormGrad


# --------------------------------------------------------------------------- ViT and Swin in explain


def _reference_channel_norms(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """||a|| * ||g|| over the LAST dim of the layer output (tokens or channels-last), computed from scratch."""
    store: Dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, i: Any, o: torch.Tensor) -> None:
        store["a"] = o

    h = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[:, target].sum(), store["a"])
    return (store["a"].detach().norm(dim=-1) * g.norm(dim=-1)).detach()


def test_vit_encoder_block_tokens_on_the_patch_grid() -> None:
    torch.manual_seed(0)
    model = _live_head(torchvision.models.vit_b_16(image_size=32).eval())
    layer = model.encoder.layers.encoder_layer_1
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert detect_layouts(model, [layer], x) == [("tokens", (2, 2))]
    (m,) = compute_maps("normgrad", model, [layer], x, torch.tensor([3, 3]), layouts="auto")
    ref = _reference_channel_norms(model, layer, x, 3)  # (2, 5): the class token, then 2 x 2 patches
    assert ref.shape == (2, 5) and (ref > 0).all()
    torch.testing.assert_close(m, ref[:, 1:].reshape(2, 1, 2, 2), rtol=1e-4, atol=1e-8)
    with pytest.raises(CLIInputError, match="gradcam assumes \\(N, C, H, W\\).*tokens: choose among normgrad"):
        compute_maps("gradcam", model, [layer], x, torch.tensor([3, 3]), layouts="auto")


def test_swin_stage_channels_last() -> None:
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    layer = model.features[3]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert detect_layouts(model, [layer], x) == [("channels_last", (8, 8))]
    (m,) = compute_maps("normgrad", model, [layer], x, torch.tensor([5, 5]), layouts="auto")
    ref = _reference_channel_norms(model, layer, x, 5)  # (2, 8, 8)
    assert (ref > 0).all()
    torch.testing.assert_close(m, ref[:, None], rtol=1e-4, atol=1e-8)


def test_explain_command_on_vit_with_layer_auto(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli.main(["explain", str(tmp_path / "a.png"), "--model", "vit_b_16", "--image-size", "32",
                     "--layer", "auto", "--out", str(out), "--save", "npy", "--target", "0"]) == 0
    err = capsys.readouterr().err
    assert "--layer auto: encoder.layers.encoder_layer_2" in err
    assert "zero everywhere" in err  # torchvision's random-init ViT head is zero: the maps carry nothing, said so
    for i in (2, 5, 7, 10):
        assert np.load(out / f"a__normgrad__encoder.layers.encoder_layer_{i}.npy").shape == (2, 2)
    # the layout can be given; a wrong one is refused with the shape
    assert cli.main(["explain", str(tmp_path / "a.png"), "--model", "vit_b_16", "--image-size", "32", "--quiet",
                     "--layer", "encoder.layers.encoder_layer_0", "--layout", "channels_first", "--out", str(out)]) == 1
    assert "layout 'channels_first' does not fit the layer's output shape (1, 5, 768)" in capsys.readouterr().err


def test_layers_suggest_subcommand(capsys) -> None:
    assert cli.main(["layers", "--suggest", "resnet18", "--image-size", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["layer1", "layer2", "layer3", "layer4"]
    assert lines[3].split("\t")[2] == "(1, 512, 2, 2)"
    assert cli.main(["layers", "--model", "resnet18", "--suggest", "--no-shapes"]) == 0
    assert capsys.readouterr().out.split() == ["layer1", "Sequential", "layer2", "Sequential", "layer3",
                                               "Sequential", "layer4", "Sequential"]
    assert cli.main(["layers"]) == 1
    assert "give the model" in capsys.readouterr().err


def test_token_layouts_that_are_not_a_patch_grid_are_refused() -> None:
    class TwoExtraTokens(nn.Module):  # DeiT-like: class + distillation token before 2 x 2 patches
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 16, stride=16)
            self.block = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 4, 8)
            t = torch.cat([t[:, :2] * 0, t], 1)  # (N, 6, 8): 2 extra tokens
            return self.head(self.block(t).mean(1))

    model = TwoExtraTokens().eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(CLIInputError, match=r"layout 'tokens' does not fit the layer's output shape \(1, 6, 8\)"):
        detect_layouts(model, [model.block], x, "tokens")
    with pytest.raises(CLIInputError, match="has no spatial layout"):  # 6 tokens: not guessed either
        detect_layouts(model, [model.block], x)
