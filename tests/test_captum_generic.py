"""Captum's own generic attribution checks, run on ``LayerNormGrad``.

Captum ships its test configuration with the package: ``captum.testing.attr.helpers.test_config``
(``config``, a list of model / layer / ``attribute_args`` cases in a fixed schema) and the helpers
of ``captum.testing.attr.helpers.gen_test_utils`` (``parse_test_config``, ``get_target_layer``,
``gen_test_name``). The drivers that turn that config into tests are *not* shipped (they live in
Captum's repository, ``tests/attr/test_targets.py::TargetsMeta`` and
``tests/attr/test_hook_removal.py::HookRemovalMeta``), so their logic is replicated here:

* **targets** (``TargetsMeta.make_single_target_test``): for every case whose target is a list
  or tensor, attribute the batch once, then each example alone with its own target (and once
  more with a one-element target list), and compare with ``assertTensorTuplesAlmostEqual``
  (``delta=target_delta`` or 1e-4, ``mode="max"``); additional forward args that are tensors are
  sliced per example.
* **hook removal** (``HookRemovalMeta.make_single_hook_removal_test``): after a normal call, after
  a call with an incorrect target ``(9999,) * 20`` and after a call where the layer is replaced by
  a module that raises (``ErrorModule``), no module of the model holds a forward, forward-pre or
  backward hook.

The cases: LayerNormGrad is added to every Captum case that lists its sibling ``LayerGradCam``
(same models, layers and arguments), plus cases in the same schema for NormGrad's own options
(``virtual_layer``, ``aggregation``, ``loss_fn``, ``attribute_to_layer_input``, a list of layers).

Deviation, on purpose: for the incorrect target Captum's driver expects an ``AssertionError``
(from Captum's ``assert`` in ``captum._utils.common._verify_select_column``); ``LayerNormGrad``
validates targets itself and raises a ``ValueError`` naming the problem, which is asserted here.
The other two modes are unchanged (the raising module's ``AssertionError`` propagates).
"""

from __future__ import annotations

import copy
import unittest
from typing import Any, Dict, List

import pytest
import torch
from captum._utils.common import _format_additional_forward_args
from captum.attr import LayerGradCam
from captum.attr._models.base import _set_deep_layer_value
from captum.testing.attr.helpers.gen_test_utils import gen_test_name, get_target_layer, parse_test_config
from captum.testing.attr.helpers.test_config import config as captum_config
from captum.testing.helpers.basic import BaseTest, assertTensorTuplesAlmostEqual
from captum.testing.helpers.basic_models import BasicModel_ConvNet, BasicModel_MultiLayer
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad

# ----------------------------------------------------------------------------- the cases

torch.manual_seed(1234)
_OWN_CASES: List[Dict[str, Any]] = [
    {
        "name": "normgrad_conv_list_target",
        "model": BasicModel_ConvNet(),
        "layer": "conv2",
        "attribute_args": {"inputs": 10 * torch.randn(4, 1, 10, 10), "target": [0, 3, 1, 9]},
    },
    {
        "name": "normgrad_conv_tensor_target_selective",
        "model": BasicModel_ConvNet(),
        "layer": "relu1",
        "attribute_args": {
            "inputs": 10 * torch.randn(4, 1, 10, 10),
            "target": torch.tensor([2, 2, 5, 7]),
            "virtual_layer": "scaling",
            "aggregation": "filter_norm",
        },
    },
    {
        "name": "normgrad_conv_weights_input_grid",
        "model": BasicModel_ConvNet(),
        "layer": "conv2",
        "attribute_args": {"inputs": 10 * torch.randn(3, 1, 10, 10), "target": [1, 4, 8], "virtual_layer": "weights"},
    },
    {
        "name": "normgrad_conv_conv3x3_max_layer_input",
        "model": BasicModel_ConvNet(),
        "layer": "conv2",
        "attribute_args": {
            "inputs": 10 * torch.randn(3, 1, 10, 10),
            "target": [1, 4, 8],
            "virtual_layer": "conv3x3",
            "aggregation": "max",
            "attribute_to_layer_input": True,
        },
    },
    {
        "name": "normgrad_conv_loss_fn",
        "model": BasicModel_ConvNet(),
        "layer": "conv1",
        "attribute_args": {
            "inputs": 10 * torch.randn(3, 1, 10, 10),
            "target": torch.tensor([0, 6, 2]),
            "loss_fn": nn.NLLLoss(reduction="none"),
        },
    },
    {
        "name": "normgrad_multi_layer_list_of_layers",
        "model": BasicModel_MultiLayer(),
        "layer": ["linear0", "relu", "linear1"],
        "attribute_args": {"inputs": torch.randn(4, 3), "target": [0, 1, 1, 0], "aggregation": "sum"},
    },
]

#: Captum's cases for LayerGradCam, with LayerNormGrad as the algorithm, then our own cases.
CASES: List[Dict[str, Any]] = [
    {**case, "algorithms": [LayerNormGrad]} for case in captum_config if LayerGradCam in case["algorithms"]
] + [{**case, "algorithms": [LayerNormGrad]} for case in _OWN_CASES]

TARGET_CASES = [c for c in CASES if isinstance(c["attribute_args"].get("target"), (list, Tensor))]


def _name(case: Dict[str, Any], prefix: str) -> str:
    return gen_test_name(prefix, case["name"], LayerNormGrad, bool(case.get("noise_tunnel", False)))


def test_our_class_joins_every_gradcam_case() -> None:
    """Guards against an empty selection (e.g. a Captum release renaming its config)."""
    from_captum = [c for c in CASES if not c["name"].startswith("normgrad_")]
    assert len(from_captum) >= 5
    assert len(TARGET_CASES) >= 6


# ----------------------------------------------------------------------------- targets


def _slice(attr: Any, i: int) -> Any:
    if isinstance(attr, Tensor):
        return attr[i : i + 1]
    return tuple(a[i : i + 1] for a in attr)


def _as_tuple(attr: Any) -> Any:
    """Captum's comparison helper takes a tensor or a tuple; a list of layers gives a list."""
    return tuple(attr) if isinstance(attr, list) else attr


@pytest.mark.parametrize("case", TARGET_CASES, ids=[_name(c, "test_target") for c in TARGET_CASES])
def test_per_example_targets_equal_batch(case: Dict[str, Any]) -> None:
    case = copy.deepcopy(case)  # as Captum's deep_copy_args: cases stay independent
    algorithms, model, args, layer, noise_tunnel, _ = parse_test_config(case)
    assert not noise_tunnel
    tc = BaseTest()
    delta = case.get("target_delta", 0.0001)
    target_layer = get_target_layer(model, layer)
    inputs, targets = args["inputs"], args["target"]
    extra = _format_additional_forward_args(args["additional_forward_args"]) if "additional_forward_args" in args else None
    n = len(inputs) if isinstance(inputs, Tensor) else len(inputs[0])
    for algorithm in algorithms:
        method = algorithm(model, target_layer)
        tc.setUp()
        batch = method.attribute(**args)
        for i in range(n):
            single_args = dict(args)
            single_args["target"] = targets[i] if len(targets) == n else targets
            single_args["inputs"] = inputs[i : i + 1] if isinstance(inputs, Tensor) else tuple(t[i : i + 1] for t in inputs)
            if extra is not None:
                single_args["additional_forward_args"] = tuple(
                    a[i : i + 1] if isinstance(a, Tensor) else a for a in extra
                )
            tc.setUp()
            single = method.attribute(**single_args)
            assertTensorTuplesAlmostEqual(tc, _slice(batch, i), _as_tuple(single), delta=delta, mode="max")
            if len(targets) == n:  # also a one-element target list
                single_args["target"] = targets[i : i + 1]
                tc.setUp()
                single_list = method.attribute(**single_args)
                assertTensorTuplesAlmostEqual(tc, _slice(batch, i), _as_tuple(single_list), delta=delta, mode="max")


# ----------------------------------------------------------------------------- hook removal


class ErrorModule(nn.Module):
    """Stands in for the hooked layer and raises, as in Captum's hook-removal driver."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("Raising error on execution")


class ErrorConv(nn.Conv2d):
    """The same for ``virtual_layer="weights"``, which only accepts Conv/Linear layers."""

    def __init__(self) -> None:
        super().__init__(1, 1, 1)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("Raising error on execution")


def _leftover_hooks(model: nn.Module) -> List[str]:
    found = []
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_backward_hooks", "_forward_pre_hooks", "_backward_pre_hooks"):
            if len(getattr(mod, attr)):
                found.append(f"{name or '<root>'}.{attr}")
    return found


@pytest.mark.parametrize("mode", ["normal", "incorrect_target", "invalid_module"])
@pytest.mark.parametrize("case", CASES, ids=[_name(c, "test_hook_removal") for c in CASES])
def test_no_hooks_left(case: Dict[str, Any], mode: str) -> None:
    case = copy.deepcopy(case)
    algorithms, model, args, layer, _, _ = parse_test_config(case)
    tc = unittest.TestCase()
    for algorithm in algorithms:
        expected_error: Any = None
        if mode == "invalid_module":
            error_module = ErrorConv() if args.get("virtual_layer") == "weights" else ErrorModule()
            _set_deep_layer_value(model, layer[0] if isinstance(layer, list) else layer, error_module)
            expected_error = AssertionError
        method = algorithm(model, get_target_layer(model, layer))
        if mode == "incorrect_target":
            args["target"] = (9999,) * 20
            expected_error = ValueError
        if expected_error is None:
            method.attribute(**args)
        else:
            with tc.assertRaises(expected_error):
                method.attribute(**args)
        assert _leftover_hooks(model) == []
