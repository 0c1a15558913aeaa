"""Generated image datasets with pixel-exact ground truth (deterministic from a seed).

Six object classes that need real features to tell apart (shape *and* texture; colours are
drawn from the same distribution for every class) on cluttered backgrounds (smooth colour
fields, distractor strokes, pixel noise), with the silhouette mask of every object:
``striped_disc``, ``dotted_disc``, ``striped_square``, ``dotted_square``, ``ring``, ``cross``
(see :data:`CLASS_NAMES`).

- :class:`ShapesDataset`: one object per image, for training and the pointing game.
- :class:`TwoObjectShapesDataset`: two objects of two different classes with disjoint masks,
  for class selectivity (the paper's cat-and-dog image).

Images are ``float32`` tensors ``(3, H, W)`` in ``[0, 1]`` (64 x 64 by default, cheap on a
CPU). Image ``i`` depends only on ``(seed, i)``: random access, any order, same pixels.
Use :data:`SPLIT_SEEDS` for the conventional train/test seeds, and :func:`write_png_folder` to
export images (and masks) as PNG files.

Examples::

    >>> from captum_normgrad.datasets import ShapesDataset, TwoObjectShapesDataset
    >>> ds = ShapesDataset(100, split="test")
    >>> image, label, mask = ds[0]          # (3, 64, 64) float, int, (64, 64) bool
    >>> pairs = TwoObjectShapesDataset(10, seed=0)
    >>> image, labels, masks = pairs[0]     # (3, 64, 64), (2,) long, (2, 64, 64) bool
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._render import CLASS_NAMES, NUM_CLASSES, ObjectSpec, render_pair, render_single

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "SPLIT_SEEDS",
    "ObjectSpec",
    "ShapesDataset",
    "TwoObjectShapesDataset",
    "write_png_folder",
]

#: Conventional seeds of the splits: the training script uses ``"train"``, evaluation ``"test"``.
SPLIT_SEEDS: Dict[str, int] = {"train": 0, "val": 1, "test": 2}


def _resolve_seed(seed: Optional[int], split: Optional[str]) -> int:
    if seed is not None and split is not None:
        raise ValueError("give either seed or split, not both (split only picks a seed from SPLIT_SEEDS)")
    if split is not None:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)} or pass seed=<int>")
        return SPLIT_SEEDS[split]
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_common(num_images: int, image_size: int) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32 (objects need room), got {image_size!r}")


class _GeneratedDataset(Dataset):
    _kind = ""

    def __init__(self, num_images: int, seed: Optional[int], split: Optional[str], image_size: int) -> None:
        _check_common(num_images, image_size)
        self.seed = _resolve_seed(seed, split)
        self.num_images = int(num_images)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return self.num_images

    def _index(self, index: int) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index out of range for a dataset of {self.num_images} images")
        return int(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_images={self.num_images}, seed={self.seed}, image_size={self.image_size})"


class ShapesDataset(_GeneratedDataset):
    r"""
    Single-object images with their label and the object's pixel mask.

    Args:

        num_images (int): Number of images.
        seed (int, optional): Seed of the images (image ``i`` depends only on
                    ``(seed, i)``). Give either ``seed`` or ``split``.
                    Default: None (seed 0)
        split (str, optional): ``"train"``, ``"val"`` or ``"test"``: picks the seed
                    from :data:`SPLIT_SEEDS`.
                    Default: None
        image_size (int, optional): Side of the square images (>= 32); object sizes
                    scale with it.
                    Default: 64

    Each item is ``(image, label, mask)``: ``image`` float32 ``(3, H, W)`` in ``[0, 1]``,
    ``label`` an int in ``range(NUM_CLASSES)``, ``mask`` bool ``(H, W)``, True on the object.
    """

    def __init__(
        self, num_images: int, seed: Optional[int] = None, split: Optional[str] = None, image_size: int = 64
    ) -> None:
        super().__init__(num_images, seed, split, image_size)

    def __getitem__(self, index: int) -> Tuple[Tensor, int, Tensor]:
        img, label, mask, _ = render_single(self.seed, self._index(index), self.image_size)
        return torch.from_numpy(img), label, torch.from_numpy(mask)

    def specs(self, index: int) -> List[ObjectSpec]:
        """The geometry and colours the image ``index`` was drawn from."""
        return render_single(self.seed, self._index(index), self.image_size)[3]

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """All images stacked: ``(images (N, 3, H, W), labels (N,) long, masks (N, H, W) bool)``."""
        items = [self[i] for i in range(len(self))]
        return (
            torch.stack([it[0] for it in items]),
            torch.tensor([it[1] for it in items], dtype=torch.long),
            torch.stack([it[2] for it in items]),
        )


class TwoObjectShapesDataset(_GeneratedDataset):
    r"""
    Images with two objects of two different classes and disjoint masks (class selectivity).

    Args:

        num_images (int): Number of images.
        seed (int, optional): Seed of the images (image ``i`` depends only on
                    ``(seed, i)``; independent of :class:`ShapesDataset` with the same
                    seed). Give either ``seed`` or ``split``.
                    Default: None (seed 0)
        split (str, optional): ``"train"``, ``"val"`` or ``"test"``: picks the seed
                    from :data:`SPLIT_SEEDS`.
                    Default: None
        image_size (int, optional): Side of the square images (>= 32).
                    Default: 64

    Each item is ``(image, labels, masks)``: ``image`` float32 ``(3, H, W)`` in ``[0, 1]``,
    ``labels`` long ``(2,)`` with two different classes, ``masks`` bool ``(2, H, W)``,
    ``masks[k]`` True on the object of class ``labels[k]``.
    """

    def __init__(
        self, num_images: int, seed: Optional[int] = None, split: Optional[str] = None, image_size: int = 64
    ) -> None:
        super().__init__(num_images, seed, split, image_size)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        img, labels, masks, _ = render_pair(self.seed, self._index(index), self.image_size)
        return torch.from_numpy(img), torch.from_numpy(labels), torch.from_numpy(masks)

    def specs(self, index: int) -> List[ObjectSpec]:
        """The geometry and colours the image ``index`` was drawn from."""
        return render_pair(self.seed, self._index(index), self.image_size)[3]

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """All images stacked: ``(images (N, 3, H, W), labels (N, 2) long, masks (N, 2, H, W) bool)``."""
        items = [self[i] for i in range(len(self))]
        return tuple(torch.stack([it[k] for it in items]) for k in range(3))  # type: ignore[return-value]


def _to_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_png_folder(
    dataset: Union[ShapesDataset, TwoObjectShapesDataset],
    folder: Union[str, Path],
    masks: bool = True,
    limit: Optional[int] = None,
) -> List[Path]:
    r"""
    Writes a generated dataset to a folder of PNG files.

    Writes ``img_00000.png``, ... (RGB, 8 bit), with ``masks=True`` the masks as
    ``masks/img_00000_0.png`` (one 8-bit PNG per object, 255 on the object), and
    ``labels.csv`` with columns ``file,labels,class_names`` (several labels joined by ``;``).

    Args:

        dataset (ShapesDataset or TwoObjectShapesDataset): The images to write.
        folder (str or Path): Output folder, created if needed.
        masks (bool, optional): Also write the object masks.
                    Default: True
        limit (int, optional): Write only the first ``limit`` images.
                    Default: None (all)

    Returns:
        *list[Path]*: the image files written, in dataset order.
    """
    if not isinstance(dataset, (ShapesDataset, TwoObjectShapesDataset)):
        raise TypeError(f"dataset must be a ShapesDataset or TwoObjectShapesDataset, got {type(dataset).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if masks:
        (folder / "masks").mkdir(exist_ok=True)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    paths: List[Path] = []
    rows = []
    for i in range(count):
        image, label, mask = dataset[i]
        name = f"img_{i:05d}.png"
        pixels = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        _to_png(pixels, folder / name)
        labels = [int(label)] if isinstance(dataset, ShapesDataset) else [int(v) for v in label]  # type: ignore[union-attr]
        object_masks = mask[None] if isinstance(dataset, ShapesDataset) else mask
        if masks:
            for k, m in enumerate(object_masks):
                _to_png(m.numpy().astype(np.uint8) * 255, folder / "masks" / f"img_{i:05d}_{k}.png")
        rows.append((name, ";".join(map(str, labels)), ";".join(CLASS_NAMES[v] for v in labels)))
        paths.append(folder / name)
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("file", "labels", "class_names"))
        writer.writerows(rows)
    return paths
