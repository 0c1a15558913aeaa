"""Bad inputs: each raises a clear error of the right type that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from captum_normgrad import LayerNormGrad


@pytest.fixture
def model(models) -> nn.Module:
    return models.small_cnn()


def test_layer_not_part_of_model(models, model: nn.Module) -> None:
    other = models.small_cnn(seed=1)
    with pytest.raises(ValueError, match=r"layer Conv2d is not a submodule of the model SmallCNN.*model\.layer3"):
        LayerNormGrad(model, other.conv2)
    with pytest.raises(ValueError, match="not a submodule"):
        LayerNormGrad(model, [model.conv1, other.conv2])


def test_layer_not_a_module(model: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"layer must be .*Module.*got str"):
        LayerNormGrad(model, "conv2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty list"):
        LayerNormGrad(model, [])


def test_layer_not_reached(model: nn.Module, image_batch: Tensor) -> None:
    model.spare = nn.Conv2d(6, 6, 1)  # a submodule that forward() never calls
    with pytest.raises(ValueError, match=r"layer spare was not reached in the forward pass.*actually calls"):
        LayerNormGrad(model, model.spare).attribute(image_batch, 0)


def test_layer_called_twice(image_batch: Tensor) -> None:
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(300, 2))
    with pytest.raises(ValueError, match=r"layer 0 was called 2 times.*layer_call=<index>.*the block itself"):
        LayerNormGrad(model, shared).attribute(image_batch, 0)
    with pytest.raises(ValueError, match=r"layer_call=2 but layer 0 is called 2 time\(s\)"):
        LayerNormGrad(model, shared).attribute(image_batch, 0, layer_call=2)
    with pytest.raises(TypeError, match=r"layer_call must be None or an int"):
        LayerNormGrad(model, shared).attribute(image_batch, 0, layer_call="last")


@pytest.mark.parametrize("layer_name", ["relu1", "bn1", "pool", "probe"])
def test_weights_mode_on_unsupported_module(model: nn.Module, image_batch: Tensor, layer_name: str) -> None:
    layer = getattr(model, layer_name)
    with pytest.raises(
        ValueError, match=rf"virtual_layer='weights' needs an nn.Conv1d/Conv2d/Conv3d or nn.Linear layer, got {type(layer).__name__}"
    ):
        LayerNormGrad(model, layer).attribute(image_batch, 0, virtual_layer="weights")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("virtual_layer", "conv1", r"unknown virtual_layer 'conv1'; choose one of 'conv1x1', 'scaling', 'bias', 'conv3x3', 'weights'"),
        ("virtual_layer", "Conv1x1", r"unknown virtual_layer 'Conv1x1'"),
        ("aggregation", "mean", r"unknown aggregation 'mean'; choose one of 'norm', 'filter_norm', 'sum', 'max'"),
        ("weights_grid", "outputs", r"unknown weights_grid 'outputs'; choose 'input' or 'output'"),
    ],
)
def test_unknown_option_names(model: nn.Module, image_batch: Tensor, option: str, value: str, message: str) -> None:
    kwargs = {option: value}
    if option == "weights_grid":
        kwargs["virtual_layer"] = "weights"
    with pytest.raises(ValueError, match=message):
        LayerNormGrad(model, model.conv2).attribute(image_batch, 0, **kwargs)


def test_unknown_keyword_argument(model: nn.Module, image_batch: Tensor) -> None:
    with pytest.raises(TypeError, match="aggregate"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, 0, aggregate="norm")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "target, message",
    [
        (5, r"target index 5 is out of range for output dim 1 of size 5 .*valid indices are 0..4"),
        (-6, r"target index -6 is out of range .*or -5..-1 from the end"),
        ([0, 1, 7], r"target\[2\] index 7 is out of range"),
        (torch.tensor([0, 9, 1]), r"target\[1\] index 9 is out of range"),
        (torch.tensor(11), r"target index 11 is out of range"),
        ((1, 2), r"target \(1, 2\) has 2 indices but the output \(3, 5\) has only 1 dims per example"),
    ],
)
def test_target_out_of_range(model: nn.Module, image_batch: Tensor, target, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerNormGrad(model, model.conv2).attribute(image_batch, target)


def test_target_missing_where_needed(model: nn.Module, image_batch: Tensor) -> None:
    with pytest.raises(ValueError, match=r"target is required: the model returns 5 values per example.*target=<class index>"):
        LayerNormGrad(model, model.conv2).attribute(image_batch)


def test_target_given_where_not_allowed(model: nn.Module, image_batch: Tensor) -> None:
    fn = lambda x: model(x)[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match=r"one value per example.*use target=None"):
        LayerNormGrad(fn, model.conv2).attribute(image_batch, 1)


@pytest.mark.parametrize("target", [[0, 1], [0, 1, 2, 3], torch.tensor([0, 1])])
def test_wrong_target_list_length(model: nn.Module, image_batch: Tensor, target) -> None:
    msg = (
        rf"target list has {len(target)} entries but the batch has 3 examples"
        if isinstance(target, list)
        else r"a target tensor must have 1 element or one per example \(3\); got shape \(2,\)"
    )
    with pytest.raises(ValueError, match=msg):
        LayerNormGrad(model, model.conv2).attribute(image_batch, target)


@pytest.mark.parametrize(
    "target, exc, message",
    [
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"integer class indices, got dtype torch.float32"),
        (1.5, TypeError, r"target must be None, an int, a tuple, a list or a tensor"),
        ([0, 1.0, 2], TypeError, r"target\[1\] must contain integers, got 1.0"),
        ("cat", TypeError, r"got str"),
    ],
)
def test_target_of_wrong_type(model: nn.Module, image_batch: Tensor, target, exc, message: str) -> None:
    with pytest.raises(exc, match=message):
        LayerNormGrad(model, model.conv2).attribute(image_batch, target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(models, model: nn.Module, image_batch: Tensor, bad: float) -> None:
    x = image_batch.clone()
    x[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match=r"inputs\[0\] contains NaN or Inf values.*torch.nan_to_num"):
        LayerNormGrad(model, model.conv2).attribute(x, 0)
    a = torch.randn(2, 2, 6, 6)
    b = torch.randn(2, 2, 6, 6)
    b[0, 0, 0, 0] = bad
    two_input = models.two_input()  # the offending input of a tuple is named
    with pytest.raises(ValueError, match=r"inputs\[1\] contains NaN or Inf"):
        LayerNormGrad(two_input, two_input.mix).attribute((a, b), 0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_inputs_to_a_conv_model(model: nn.Module, image_batch: Tensor, dtype: torch.dtype) -> None:
    x = (image_batch.abs() * 50).to(dtype)
    with pytest.raises(TypeError, match=rf"integer inputs \(inputs\[0\] have dtype {dtype}\).*x\.float\(\)"):
        LayerNormGrad(model, model.conv2).attribute(x, 0)


def test_non_tensor_inputs(model: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"inputs must be a torch.Tensor or a tuple of tensors, got list.*as_tensor"):
        LayerNormGrad(model, model.conv2).attribute([[1.0, 2.0]], 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inputs\[1\] is a float, not a torch.Tensor.*additional_forward_args"):
        LayerNormGrad(model, model.conv2).attribute((torch.randn(1, 3, 8, 8), 0.5), 0)


def test_loss_fn_returning_a_batch_mean(model: nn.Module, image_batch: Tensor) -> None:
    with pytest.raises(ValueError, match=r"loss_fn must return one loss per example, shape \(3,\); got \(\).*reduction='none'"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, torch.tensor([0, 1, 2]), loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"got float"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, [0, 1, 2], loss_fn=lambda out, t: 1.0)


def test_loss_fn_target_out_of_range(model: nn.Module, image_batch: Tensor) -> None:
    ce = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match=r"target index 8 is out of range"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, 8, loss_fn=ce)
    with pytest.raises(ValueError, match=r"target list has 2 entries but the batch has 3"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, [0, 1], loss_fn=ce)


def test_weights_with_attribute_to_layer_input(model: nn.Module, image_batch: Tensor) -> None:
    with pytest.raises(ValueError, match=r"virtual_layer='weights'.*attribute_to_layer_input does not apply.*weights_grid"):
        LayerNormGrad(model, model.conv2).attribute(image_batch, 0, virtual_layer="weights", attribute_to_layer_input=True)


def test_conv3x3_on_a_layer_without_locations(model: nn.Module, image_batch: Tensor) -> None:
    with pytest.raises(ValueError, match=r"virtual_layer='conv3x3' needs 1 to 3 location dims"):
        LayerNormGrad(model, model.fc).attribute(image_batch, 0, virtual_layer="conv3x3")


@pytest.mark.parametrize("channel_dim, exc, message", [(0, ValueError, "batch dim"), (1.0, TypeError, "must be an int")])
def test_bad_channel_dim(model: nn.Module, image_batch: Tensor, channel_dim, exc, message: str) -> None:
    with pytest.raises(exc, match=message):
        LayerNormGrad(model, model.conv2).attribute(image_batch, 0, channel_dim=channel_dim)


def test_layer_with_integer_output(image_batch: Tensor) -> None:
    class ArgmaxNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pick = nn.Identity()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(x)
            idx = self.pick(h.argmax(1))
            return self.fc(h.mean((2, 3))) + 0 * idx.sum()

    net = ArgmaxNet()
    with pytest.raises(TypeError, match=r"layer pick produced a tensor of dtype torch.int64; gradients need floating-point"):
        LayerNormGrad(net, net.pick).attribute(image_batch, 0)
