"""Tests of the generated ground-truth datasets (captum_normgrad.datasets)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from captum_normgrad.datasets import (
    CLASS_NAMES,
    NUM_CLASSES,
    SPLIT_SEEDS,
    ShapesDataset,
    TwoObjectShapesDataset,
    write_png_folder,
)


def _independent_silhouette(spec, size):
    """Straightforward per-pixel membership test (loops, no vectorisation) of an object."""
    out = np.zeros((size, size), dtype=bool)
    shape = CLASS_NAMES[spec.label].split("_")[-1]
    c, s = np.cos(spec.angle), np.sin(spec.angle)
    for i in range(size):
        for j in range(size):
            dy, dx = i + 0.5 - spec.cy, j + 0.5 - spec.cx
            r = np.hypot(dx, dy)
            u, v = c * dx + s * dy, -s * dx + c * dy
            if shape == "disc":
                inside = r <= spec.radius
            elif shape == "square":
                inside = max(abs(u), abs(v)) <= 0.82 * spec.radius
            elif shape == "ring":
                inside = 0.55 * spec.radius <= r <= spec.radius
            else:  # cross
                arm = 0.3 * spec.radius
                inside = (abs(u) <= arm and abs(v) <= spec.radius) or (abs(v) <= arm and abs(u) <= spec.radius)
            out[i, j] = inside
    return out


def test_single_item_types_and_ranges():
    ds = ShapesDataset(8, seed=3)
    assert len(ds) == 8
    for image, label, mask in ds:
        assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert isinstance(label, int) and 0 <= label < NUM_CLASSES
        assert mask.dtype == torch.bool and mask.shape == (64, 64)
        # objects are large enough to point at and never touch the border
        assert 150 < int(mask.sum()) < 64 * 64 // 2
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 10_000))
def test_determinism_from_seed_and_random_access(seed, index):
    a = ShapesDataset(index + 1, seed=seed)
    b = ShapesDataset(index + 5, seed=seed)  # length does not change the images
    ia, la, ma = a[index]
    ib, lb, mb = b[index]
    assert torch.equal(ia, ib) and la == lb and torch.equal(ma, mb)
    assert torch.equal(a[-1][0], ia)
    other = ShapesDataset(index + 1, seed=seed + 1)[index][0]
    assert not torch.equal(other, ia)


def test_pairs_deterministic():
    a, b = TwoObjectShapesDataset(4, seed=11), TwoObjectShapesDataset(4, seed=11)
    for (ia, la, ma), (ib, lb, mb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(ma, mb)


def test_masks_match_objects_single():
    ds = ShapesDataset(6, seed=5)
    for i in range(len(ds)):
        image, label, mask = ds[i]
        (spec,) = ds.specs(i)
        assert spec.label == label
        np.testing.assert_array_equal(mask.numpy(), _independent_silhouette(spec, 64))
        # the object's pixels take (up to pixel noise) only its two colours
        pix = image.permute(1, 2, 0)[mask].numpy()
        cols = np.stack([spec.colour_a, spec.colour_b])
        dist = np.abs(pix[:, None, :] - cols[None]).max(-1).min(-1)
        clipped = (pix <= 0.0) | (pix >= 1.0)
        assert np.mean((dist < 0.2) | clipped.any(-1)) > 0.98


def test_two_objects_distinct_classes_disjoint_masks():
    ds = TwoObjectShapesDataset(12, seed=2)
    for i in range(len(ds)):
        image, labels, masks = ds[i]
        assert labels.dtype == torch.long and labels.shape == (2,)
        assert labels[0] != labels[1]
        assert masks.shape == (2, 64, 64) and masks.dtype == torch.bool
        assert not (masks[0] & masks[1]).any()
        assert masks[0].sum() > 80 and masks[1].sum() > 80
        specs = ds.specs(i)
        for k in range(2):
            assert specs[k].label == int(labels[k])
            np.testing.assert_array_equal(masks[k].numpy(), _independent_silhouette(specs[k], 64))


def test_classes_balanced_and_not_separable_by_mean_colour():
    images, labels, masks = ShapesDataset(600, split="train").tensors()
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    assert counts.min() > 600 / NUM_CLASSES * 0.6
    # nearest-class-mean classifier on the object's mean colour (knows the mask!) stays weak
    m = masks[:, None].float()
    obj_colour = (images * m).sum((2, 3)) / m.sum((2, 3))
    train, test = slice(0, 400), slice(400, 600)
    means = torch.stack([obj_colour[train][labels[train] == c].mean(0) for c in range(NUM_CLASSES)])
    pred = torch.cdist(obj_colour[test], means).argmin(1)
    acc = (pred == labels[test]).float().mean().item()
    assert acc < 0.4, acc


def test_splits_use_their_seeds():
    assert torch.equal(ShapesDataset(2, split="test")[1][0], ShapesDataset(2, seed=SPLIT_SEEDS["test"])[1][0])
    assert not torch.equal(ShapesDataset(1, split="train")[0][0], ShapesDataset(1, split="test")[0][0])


def test_image_size_scales():
    image, label, mask = ShapesDataset(1, seed=0, image_size=96)[0]
    assert image.shape == (3, 96, 96) and mask.shape == (96, 96)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(num_images=0), ValueError, "num_images"),
        (dict(num_images=2, seed=-1), ValueError, "seed"),
        (dict(num_images=2, seed=1, split="train"), ValueError, "either seed or split"),
        (dict(num_images=2, split="dev"), ValueError, "split"),
        (dict(num_images=2, image_size=16), ValueError, "image_size"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        ShapesDataset(**kwargs)
    with pytest.raises(exc, match=words):
        TwoObjectShapesDataset(**kwargs)


def test_bad_index():
    ds = ShapesDataset(3)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(TypeError, match="index"):
        ds["a"]


def test_write_png_folder_roundtrip(tmp_path):
    from PIL import Image

    ds = TwoObjectShapesDataset(3, seed=4)
    paths = write_png_folder(ds, tmp_path / "pairs")
    assert [p.name for p in paths] == ["img_00000.png", "img_00001.png", "img_00002.png"]
    with open(tmp_path / "pairs" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i, (p, row) in enumerate(zip(paths, rows)):
        image, labels, masks = ds[i]
        png = np.asarray(Image.open(p)).astype(np.float32) / 255.0
        np.testing.assert_allclose(png, image.permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)
        assert row["file"] == p.name and row["labels"] == f"{int(labels[0])};{int(labels[1])}"
        assert row["class_names"].split(";") == [CLASS_NAMES[int(v)] for v in labels]
        for k in range(2):
            m = np.asarray(Image.open(tmp_path / "pairs" / "masks" / f"img_{i:05d}_{k}.png")) > 127
            np.testing.assert_array_equal(m, masks[k].numpy())
    single = write_png_folder(ShapesDataset(5, seed=1), tmp_path / "single", masks=False, limit=2)
    assert len(single) == 2 and not (tmp_path / "single" / "masks").exists()
    with pytest.raises(TypeError, match="ShapesDataset"):
        write_png_folder([1, 2], tmp_path / "x")
    with pytest.raises(ValueError, match="limit"):
        write_png_folder(ds, tmp_path / "y", limit=0)
