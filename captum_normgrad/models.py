"""Small benchmark models trained on the generated shapes, and torchvision models by name.

Two architectures mirror the ones of the NormGrad paper at a CPU-friendly scale (64 x 64 images,
see :mod:`captum_normgrad.datasets`):

- :class:`ShapesVGG`: VGG-style, four blocks of two ``conv3x3-BN-ReLU`` in one ``features``
  ``nn.Sequential`` (refer to layers as ``features.<i>`` like torchvision's VGG), 2x2 max pooling
  between blocks, global average pooling and a linear classifier.
- :class:`ShapesResNet`: ResNet-style with ``BasicBlock`` s in ``layer1`` ... ``layer4``, global
  average pooling and ``fc``, like torchvision's ResNet.

Both list the modules at the end of each block in ``model.block_names`` (``"block1"`` ...
``"block4"`` in :func:`benchmark_layers`), the points where the paper explains VGG16
(``features.3/.8/.15/.22/.29``) and ResNet50 (``layer1`` ... ``layer4``).

:func:`load_benchmark_model` returns a model with the committed trained weights (package data in
``captum_normgrad/assets``, written by ``benchmarks/train_models.py``). :func:`torchvision_model`
builds a torchvision model by name, with pretrained weights for users who can download them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .datasets import NUM_CLASSES

__all__ = [
    "BENCHMARK_MODELS",
    "PAPER_LAYERS",
    "ShapesVGG",
    "ShapesResNet",
    "build_benchmark_model",
    "load_benchmark_model",
    "benchmark_layers",
    "weights_path",
    "torchvision_model",
]

#: Names accepted by :func:`build_benchmark_model` / :func:`load_benchmark_model`.
BENCHMARK_MODELS: Tuple[str, ...] = ("vgg", "resnet")

#: Layers explained in the NormGrad paper for the torchvision models (block ends).
PAPER_LAYERS: Dict[str, List[str]] = {
    "vgg16": ["features.3", "features.8", "features.15", "features.22", "features.29"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
}

_ASSETS = Path(__file__).resolve().parent / "assets"


class ShapesVGG(nn.Module):
    r"""
    VGG-style CNN for the generated shapes (64 x 64 inputs, any size >= 16 works).

    Args:

        num_classes (int, optional): Number of output classes.
                    Default: ``NUM_CLASSES`` (6)
        widths (sequence of int, optional): Channels of the four blocks.
                    Default: ``(12, 24, 48, 96)``

    ``features`` is an ``nn.Sequential`` of blocks ``[conv, BN, ReLU, conv, BN, ReLU]`` separated by
    ``MaxPool2d(2)``; ``block_names`` holds the names of the last ReLU of each block
    (``features.5``, ``features.12``, ``features.19``, ``features.26``).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: Sequence[int] = (12, 24, 48, 96)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive ints, got {widths!r}")
        self.config: Dict[str, Any] = {"num_classes": int(num_classes), "widths": list(widths)}
        layers: List[nn.Module] = []
        names: List[str] = []
        c_in = 3
        for b, c in enumerate(widths):
            if b > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=False)]
                c_in = c
            names.append(f"features.{len(layers) - 1}")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.block_names: List[str] = names

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BN, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ShapesResNet(nn.Module):
    r"""
    ResNet-style CNN for the generated shapes (64 x 64 inputs).

    Args:

        num_classes (int, optional): Number of output classes.
                    Default: ``NUM_CLASSES`` (6)
        widths (sequence of int, optional): Channels of ``layer1`` ... ``layer4``.
                    Default: ``(16, 32, 64, 128)``

    A 3x3 stem (``conv1``, ``bn1``, ``relu``, ``maxpool`` 2x2) followed by one
    :class:`BasicBlock` per layer (``layer2``-``layer4`` halve the resolution), global average
    pooling and ``fc``; on 64 x 64 inputs the layer outputs are 32, 16, 8 and 4 pixels wide
    (strides 2-16, like ResNet50's 4-32 on 224 px). ``block_names`` is
    ``["layer1", "layer2", "layer3", "layer4"]``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive ints, got {widths!r}")
        self.config: Dict[str, Any] = {"num_classes": int(num_classes), "widths": list(widths)}
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.layer4 = BasicBlock(widths[2], widths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.block_names: List[str] = ["layer1", "layer2", "layer3", "layer4"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_ARCHS = {"vgg": ShapesVGG, "resnet": ShapesResNet}


def _check_name(name: str) -> None:
    if name not in _ARCHS:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of {list(BENCHMARK_MODELS)}")


def build_benchmark_model(name: str, **config: Any) -> nn.Module:
    """A freshly initialised benchmark model (``"vgg"`` or ``"resnet"``); ``config`` goes to the class."""
    _check_name(name)
    return _ARCHS[name](**config)


def weights_path(name: str) -> Path:
    """Where the committed weights of benchmark model ``name`` live (a safetensors file)."""
    _check_name(name)
    return _ASSETS / f"shapes_{name}.safetensors"


def load_benchmark_model(
    name: str, weights: Union[str, Path, None] = "default", device: Union[str, torch.device, None] = None
) -> nn.Module:
    r"""
    A benchmark model in eval mode, float32, with trained or random weights.

    Args:

        name (str): ``"vgg"`` (:class:`ShapesVGG`) or ``"resnet"`` (:class:`ShapesResNet`).
        weights (str, Path or None, optional): ``"default"`` loads the committed weights
                    (trained by ``benchmarks/train_models.py``), a path loads a safetensors
                    file written by that script, ``None`` keeps a random initialisation.
                    Default: ``"default"``
        device (str or torch.device, optional): Where to put the model.
                    Default: None (CPU)

    Returns:
        *nn.Module*: the model, in eval mode. The architecture configuration stored with the
        weights is used, so widths changed in the script load correctly.

    Examples::

        >>> from captum_normgrad.models import load_benchmark_model, benchmark_layers
        >>> model = load_benchmark_model("resnet")
        >>> layers = benchmark_layers(model)   # {"block1": model.layer1, ...}
    """
    _check_name(name)
    if weights is None:
        model = build_benchmark_model(name)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = weights_path(name) if isinstance(weights, str) and weights == "default" else Path(weights)
        if not path.is_file():
            hint = (
                "run `python benchmarks/train_models.py` to create it"
                if isinstance(weights, str) and weights == "default"
                else "pass weights='default', None or the path of a file written by benchmarks/train_models.py"
            )
            raise FileNotFoundError(f"no weights file at {path}: {hint}")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("arch", name) != name:
            raise ValueError(f"{path} holds weights of a {meta['arch']!r} model, not {name!r}")
        config = json.loads(meta.get("config", "{}"))
        model = build_benchmark_model(name, **config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        model.load_state_dict(state)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def benchmark_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{"block1": module, ..., "block4": module}``: the end of each block of a benchmark model."""
    names = getattr(model, "block_names", None)
    if names is None:
        raise TypeError(
            f"{type(model).__name__} has no block_names; use a ShapesVGG/ShapesResNet or pick layers by name"
        )
    modules = dict(model.named_modules())
    return {f"block{i + 1}": modules[n] for i, n in enumerate(names)}


def torchvision_model(name: str, weights: Optional[str] = None) -> nn.Module:
    r"""
    A torchvision classification model by name, in eval mode.

    Args:

        name (str): A torchvision model name, e.g. ``"vgg16"``, ``"resnet50"``.
        weights (str, optional): torchvision weights name, e.g. ``"DEFAULT"`` or
                    ``"IMAGENET1K_V1"`` (downloads them: needs internet the first time).
                    Default: None (random initialisation)

    Returns:
        *nn.Module*: the model. The paper's layers for it are in :data:`PAPER_LAYERS`.
    """
    from .io import CLIInputError, load_model  # the package's one model loader

    try:
        return load_model(name, weights=weights).model.eval()
    except CLIInputError as exc:
        raise ValueError(str(exc)) from None
