r"""Read the folder written by ``captum-normgrad explain`` and score its maps against masks.

An explain run folder holds ``index.json`` (model, methods, layers, one record per image with its
target, prediction and probabilities), the raw maps ``IMAGE__METHOD__LAYER.npy`` (or ``.pt``) at
the layer's resolution, and ``preprocess.json``, the preprocessing geometry (resize, centre crop,
mean, std; written by ``captum-normgrad explain``, or by :func:`record_preprocessing` after
:func:`captum_normgrad.explain.explain_files`) that places a map back on the original, uncropped
photograph.

Examples::

    >>> run = load_explain_run("maps/")
    >>> run.methods, run.layers
    (['normgrad', 'gradcam'], ['layer2', 'layer3'])
    >>> scores = score_run(run, masks="masks/")          # pointing hit and energy on the mask
    >>> write_grids(run, cmap="viridis")                  # one publication grid per image
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ExplainRun",
    "describe_preprocess",
    "record_preprocessing",
    "load_explain_run",
    "find_masks",
    "mask_to_model_input",
    "score_map",
    "score_run",
    "write_grids",
]

Geometry = Tuple[Optional[int], Tuple[int, int]]


def describe_preprocess(preprocess: Any, mean: Sequence[float], std: Sequence[float]) -> Optional[Dict[str, Any]]:
    r"""The geometry and normalisation of a torchvision-style preprocessing, as a JSON-able dict.

    Reads ``resize_size`` and ``crop_size`` of a torchvision ``ImageClassification`` preset (what
    ``weights.transforms()`` and :func:`captum_normgrad.io.make_preprocess` return).

    Args:
        preprocess (Any): the transform.
        mean (sequence of float): its normalisation mean.
        std (sequence of float): its normalisation standard deviation.

    Returns:
        dict or None: ``{"resize_size": int or None, "crop_size": [h, w], "mean": [...], "std": [...]}``,
        None when the transform has no such geometry (a custom transform).

    Examples::

        >>> t = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
        >>> describe_preprocess(t, t.mean, t.std)["crop_size"]
        [224, 224]
    """
    crop = getattr(preprocess, "crop_size", None)
    resize = getattr(preprocess, "resize_size", None)
    if crop is None:
        return None
    crop_l = [int(v) for v in (crop if isinstance(crop, (list, tuple)) else [crop])]
    if len(crop_l) == 1:
        crop_l = crop_l * 2
    if isinstance(resize, (list, tuple)):
        if len(resize) != 1:  # resize to a fixed (h, w): not the shorter-side geometry this package maps back
            return None
        resize = resize[0]
    return {
        "resize_size": None if resize is None else int(resize),
        "crop_size": crop_l,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


PREPROCESS_FILE = "preprocess.json"


def record_preprocessing(folder: Union[str, Path], loaded: Any) -> Path:
    r"""Write ``preprocess.json`` (see :func:`describe_preprocess`) into an explain run folder.

    ``captum-normgrad explain`` does it; call it after :func:`captum_normgrad.explain.explain_files`
    in Python so that the report and the grids place the maps on the original, uncropped images.

    Args:
        folder (str or Path): the run folder.
        loaded (LoadedModel): the model and preprocessing, from :func:`captum_normgrad.io.load_model`.

    Returns:
        Path: the file written.

    Examples::

        >>> explain_files(items, loaded, layers, ["normgrad"], out="maps")
        >>> record_preprocessing("maps", loaded)
    """
    p = Path(folder) / PREPROCESS_FILE
    p.write_text(json.dumps(describe_preprocess(loaded.preprocess, loaded.mean, loaded.std), indent=1) + "\n",
                 encoding="utf-8")
    return p


@dataclass
class ExplainRun:
    r"""An explain run folder, read.

    Attributes:
        folder (Path): the folder.
        index (dict): ``index.json`` as written by :func:`captum_normgrad.explain.explain_files`.
        rows (list[dict]): one record per image (``name``, ``image``, ``target``, ``pred``,
                    ``prob_target``, ``prob_pred``, class names when known).
        methods (list[str]): method names, in run order.
        layers (list[str]): layer names, in run order.
        preprocess (dict or None): ``preprocess.json``, see :func:`describe_preprocess`; None when
                    absent (maps are then assumed to cover the whole image).
    """

    folder: Path
    index: Dict[str, Any]
    rows: List[Dict[str, Any]] = field(default_factory=list)
    methods: List[str] = field(default_factory=list)
    layers: List[str] = field(default_factory=list)
    preprocess: Optional[Dict[str, Any]] = None

    def geometry(self) -> Optional[Geometry]:
        """``(resize_size, crop_size)`` for :func:`captum_normgrad.viz.map_to_original`, or None."""
        if not self.preprocess:
            return None
        crop = self.preprocess["crop_size"]
        return (self.preprocess.get("resize_size"), (int(crop[0]), int(crop[-1])))

    def map_path(self, row: Dict[str, Any], method: str, layer: str) -> Path:
        """The raw map file of one image, method and layer (``.npy`` preferred, else ``.pt``)."""
        stem = f"{row['name']}__{method}__{layer}"
        for ext in (".npy", ".pt"):
            p = self.folder / (stem + ext)
            if p.is_file():
                return p
        raise FileNotFoundError(
            f"no raw map {stem}.npy or .pt in {self.folder}: the run was saved without raw maps; "
            "rerun explain with --save png,npy"
        )

    def load_map(self, row: Dict[str, Any], method: str, layer: str) -> np.ndarray:
        """The raw ``(h, w)`` map of one image, method and layer, as float64."""
        p = self.map_path(row, method, layer)
        if p.suffix == ".npy":
            return np.load(p).astype(np.float64)
        import torch

        return torch.load(p, weights_only=True).double().numpy()

    def image_path(self, row: Dict[str, Any], image_root: Optional[Union[str, Path]] = None) -> Path:
        """The original image of a record: as recorded, else its file name under ``image_root``."""
        p = Path(row["image"])
        if not p.is_absolute() and not p.is_file():
            p = (self.folder / p) if (self.folder / p).is_file() else p
        if p.is_file():
            return p
        if image_root is not None and (Path(image_root) / Path(row["image"]).name).is_file():
            return Path(image_root) / Path(row["image"]).name
        raise FileNotFoundError(
            f"original image {row['image']!r} of {row['name']!r} not found (moved?); pass --images DIR "
            "(image_root) with the original images, or run from the folder where explain ran"
        )

    def caption(self, row: Dict[str, Any]) -> str:
        """``"class name (p=0.93)"`` of the explained target (index when no names are known)."""
        name = row.get("target_name", f"class {row['target']}")
        return f"{name} (p={row['prob_target']:.2f})"


def load_explain_run(folder: Union[str, Path]) -> ExplainRun:
    r"""Read an explain run folder.

    Args:
        folder (str or Path): the ``--out`` folder of ``captum-normgrad explain``.

    Returns:
        ExplainRun

    Raises:
        FileNotFoundError: no such folder, or no ``index.json`` in it.
        ValueError: ``index.json`` is not an explain index (e.g. a runner folder).

    Examples::

        >>> run = load_explain_run("maps")
        >>> len(run.rows)
        6
    """
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"no such run folder: {str(folder)!r}")
    idx = d / "index.json"
    if not idx.is_file():
        raise FileNotFoundError(
            f"{d} has no index.json: give the --out folder of `captum-normgrad explain` (run explain first)"
        )
    try:
        index = json.loads(idx.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{idx} is not valid JSON ({e}); rerun explain to rewrite it") from None
    if (d / "run.json").is_file() and not isinstance(index, dict):
        raise ValueError(f"{d} is a runner output folder; the report reads explain folders (captum-normgrad explain)")
    if not isinstance(index, dict) or not {"images", "methods", "layers"} <= set(index):
        raise ValueError(f"{idx} is not an explain index (needs images, methods and layers); rerun explain")
    pre_file = d / PREPROCESS_FILE
    pre = json.loads(pre_file.read_text(encoding="utf-8")) if pre_file.is_file() else None
    if pre is None:
        why = ("its preprocessing has no resize/centre-crop geometry" if pre_file.is_file() else
               f"it has no {PREPROCESS_FILE} (an older run, or explain_files without record_preprocessing)")
        warnings.warn(
            f"{d}: {why}; maps are drawn over the whole image, which is right only if the model saw the whole "
            "image", stacklevel=2,
        )
    return ExplainRun(d, index, list(index["images"]), list(index["methods"]), list(index["layers"]), pre)


def find_masks(folder: Union[str, Path], names: Sequence[str]) -> Dict[str, Path]:
    r"""Mask files of a folder matched to image names by file stem (``cat.jpg`` <- ``cat.png``).

    Args:
        folder (str or Path): folder of masks: any image format, non-zero = the explained object.
        names (sequence of str): the run's image names (``row["name"]``).

    Returns:
        dict[str, Path]: image name -> mask file, for the names that have one.
    """
    from ..io import IMAGE_EXTENSIONS

    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"no such mask folder: {str(folder)!r}")
    by_stem = {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    found = {}
    for n in names:
        for key in (n, Path(n).stem, n.split("__")[0]):
            if key in by_stem:
                found[n] = by_stem[key]
                break
    return found


def mask_to_model_input(mask: np.ndarray, geometry: Optional[Geometry]) -> np.ndarray:
    r"""Apply the preprocessing geometry (resize, centre crop; nearest) to a mask of the original image.

    Args:
        mask (ndarray): ``(H, W)`` boolean mask of the original image.
        geometry (tuple, optional): ``(resize_size, (crop_h, crop_w))``, None for identity.

    Returns:
        ndarray: boolean mask of the model input (the part of the mask the model saw).
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize

    m = torch.from_numpy(np.asarray(mask, dtype=np.uint8))[None]
    if geometry is not None:
        size, crop = geometry
        if size is not None:
            m = resize(m, [int(size)], interpolation=InterpolationMode.NEAREST, antialias=False)
        m = center_crop(m, [int(crop[0]), int(crop[1])])
    return m[0].numpy().astype(bool)


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
    return a > 0


def score_map(heat: np.ndarray, mask: np.ndarray, tolerance: float = 15) -> Dict[str, Any]:
    r"""Pointing hit and energy on the mask of one map, the mask at the model input's resolution.

    :func:`captum_normgrad.evaluation.pointing_game_hits` and
    :func:`captum_normgrad.evaluation.energy_pointing_game` (positive mass, ``negative="clip"``).

    Args:
        heat (ndarray): ``(h, w)`` map.
        mask (ndarray): ``(H, W)`` boolean mask of the model input, not empty.
        tolerance (float, optional): pointing tolerance in pixels. Default: 15

    Returns:
        dict: ``{"hit": bool, "energy": float}``.
    """
    import torch

    from ..evaluation.localisation import energy_pointing_game, pointing_game_hits

    m = torch.as_tensor(np.asarray(heat, dtype=np.float64))[None, None]
    t = torch.as_tensor(np.asarray(mask, dtype=bool))[None]
    return {"hit": bool(pointing_game_hits(m, t, tolerance=tolerance)[0]),
            "energy": float(energy_pointing_game(m, t, negative="clip")[0])}


def score_run(
    run: ExplainRun,
    masks: Union[str, Path],
    tolerance: float = 15,
) -> Dict[Tuple[str, str, str], Dict[str, Any]]:
    r"""Pointing hit and energy on the mask of every map of a run, from its raw maps and mask files.

    The mask of the original image goes through the run's preprocessing geometry
    (:func:`mask_to_model_input`), then :func:`captum_normgrad.evaluation.pointing_game_hits` and
    :func:`captum_normgrad.evaluation.energy_pointing_game` (positive mass, ``negative="clip"``) score
    the map against it at the model input's resolution.

    Args:
        run (ExplainRun): from :func:`load_explain_run`.
        masks (str or Path): folder of masks named like the images (see :func:`find_masks`).
        tolerance (float, optional): pointing-game tolerance in pixels of the model input. Default: 15

    Returns:
        dict: ``(image name, method, layer) -> {"hit": bool or None, "energy": float or None,
        "note": str}``; None where the mask is missing or empty inside the crop (the note says which).

    Examples::

        >>> scores = score_run(load_explain_run("maps"), "masks", tolerance=15)
        >>> scores[("cat", "normgrad", "layer3")]
        {'hit': True, 'energy': 0.61, 'note': ''}
    """
    found = find_masks(masks, [r["name"] for r in run.rows])
    if not found:
        raise ValueError(
            f"no mask in {masks} matches an image of the run (masks are matched by file name: "
            f"{run.rows[0]['name'] if run.rows else 'IMAGE'}.png for {run.rows[0]['image'] if run.rows else 'IMAGE.jpg'})"
        )
    out: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    geo = run.geometry()
    for row in run.rows:
        name = row["name"]
        mk: Optional[np.ndarray] = None
        note = ""
        if name not in found:
            note = "no mask"
        else:
            mk = mask_to_model_input(_read_mask(found[name]), geo)
            if not mk.any():
                note = "mask empty inside the crop"
                mk = None
        for method in run.methods:
            for layer in run.layers:
                rec: Dict[str, Any] = {"hit": None, "energy": None, "note": note}
                if mk is not None:
                    rec.update(score_map(run.load_map(row, method, layer), mk, tolerance))
                out[(name, method, layer)] = rec
    return out


def write_grids(
    run: ExplainRun,
    out: Optional[Union[str, Path]] = None,
    image_root: Optional[Union[str, Path]] = None,
    cmap: str = "viridis",
    alpha: float = 0.55,
    scale: str = "map",
    dpi: int = 150,
    progress: bool = False,
) -> List[Path]:
    r"""One publication grid (methods x layers over the original image) per image of a run.

    Drawn by :func:`captum_normgrad.viz.plot_comparison_grid` with the run's preprocessing
    geometry (maps placed on the uncropped photograph) and the class name and probability as caption.

    Args:
        run (ExplainRun): from :func:`load_explain_run`.
        out (str or Path, optional): output folder; the run folder when None. Default: None
        image_root (str or Path, optional): where the original images are, if moved. Default: None
        cmap (str, optional): colour map. Default: ``"viridis"``
        alpha (float, optional): opacity of the maps. Default: 0.55
        scale (str, optional): colour scale, see :func:`~captum_normgrad.viz.plot_comparison_grid`.
                    Default: ``"map"``
        dpi (int, optional): resolution. Default: 150
        progress (bool, optional): tqdm progress bar over images. Default: False

    Returns:
        list[Path]: the PNG files, ``grid__IMAGE.png``.
    """
    from tqdm.auto import tqdm

    from ..io import load_image
    from ..viz import plot_comparison_grid

    d = Path(out) if out is not None else run.folder
    written = []
    geo = run.geometry()
    for row in tqdm(run.rows, desc="grids", unit="img", disable=not progress, leave=False):
        photo = load_image(run.image_path(row, image_root))
        maps = {m: {layer: [run.load_map(row, m, layer)] for layer in run.layers} for m in run.methods}
        title = f"{row['name']}: {run.index.get('model', '')}"
        fig = plot_comparison_grid([photo], maps, d / f"grid__{row['name']}.png", captions=[run.caption(row)],
                                   geometry=[geo], cmap=cmap, alpha=alpha, scale=scale, title=title, dpi=dpi)
        fig.clear()
        written.append(d / f"grid__{row['name']}.png")
    return written
