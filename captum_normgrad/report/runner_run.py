r"""Read a dataset-scale run (``captum-normgrad run``, :mod:`captum_normgrad.runner`) for the report.

The runner stores maps (``maps/METHOD/LAYER`` in its shards), targets and predictions, not images:
the images are taken again from the run's dataset, rebuilt from the configuration saved in
``run.json``. A dataset whose items carry an object mask (``(image, label, mask)``, as the
package's generated datasets do) gives every map its pointing hit and energy on the mask.

Examples::

    >>> samples = read_runner_run("maps_run", max_images=50)
    >>> samples.methods, samples.layers
    (['gradcam', 'normgrad'], ['layer2', 'layer3', 'layer4'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

__all__ = ["RunnerSamples", "read_runner_run"]


@dataclass
class RunnerSamples:
    r"""The first images of a runner output with their maps and (when the dataset has them) masks.

    Attributes:
        folder (Path): the run folder.
        description (str): model and dataset, for titles.
        methods (list[str]): method names.
        layers (list[str]): layer names (a method may lack some: Grad-CAM at the last block only).
        names (list[str]): sample ids.
        images (list[ndarray]): ``(H, W, 3)`` images in ``[0, 1]`` (normalisation undone).
        targets (list[int]): explained classes.
        predictions (list[int]): predicted classes.
        masks (list[ndarray or None]): ``(H, W)`` boolean object masks, or None.
        maps (dict): ``(sample position, method, layer) -> (h, w)`` map.
        class_names (list[str] or None): names of the classes, when known.
        total (int): samples in the run (``len(names)`` may be smaller, see ``max_images``).
    """

    folder: Path
    description: str
    methods: List[str] = field(default_factory=list)
    layers: List[str] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    images: List[np.ndarray] = field(default_factory=list)
    targets: List[int] = field(default_factory=list)
    predictions: List[int] = field(default_factory=list)
    masks: List[Optional[np.ndarray]] = field(default_factory=list)
    maps: Dict[Tuple[int, str, str], np.ndarray] = field(default_factory=dict)
    class_names: Optional[List[str]] = None
    total: int = 0


def read_runner_run(folder: Union[str, Path], max_images: Optional[int] = 100) -> RunnerSamples:
    r"""Images, maps, targets and masks of the first samples of a runner output folder.

    Args:
        folder (str or Path): the ``output`` folder of a finished run (``run.json``, ``index.json``).
        max_images (int, optional): read at most this many samples (in dataset order); None for
                    all. Default: 100

    Returns:
        RunnerSamples

    Raises:
        FileNotFoundError: not a runner folder, or the run is not finished.
        ValueError: the dataset cannot be rebuilt from ``run.json`` (moved files, ...).
    """
    import torch

    from ..runner.config import RunConfig
    from ..runner.resolve import resolve_dataset
    from ..runner.storage import RunOutput
    from ..viz import unnormalize

    d = Path(folder)
    out = RunOutput(d)
    samples = out.samples  # raises when the run is unfinished
    cfg_dict = dict(out.run["config"])
    try:
        cfg = RunConfig.from_dict(cfg_dict, base_dir=d.parent)
        dataset = resolve_dataset(cfg)
    except (ValueError, TypeError, OSError, ImportError) as e:
        raise ValueError(
            f"cannot rebuild the dataset of the run in {d} from its run.json ({e}); the report needs the images: "
            "run it where the dataset is reachable"
        ) from None
    keep = samples if max_images is None else samples[: int(max_images)]
    res = RunnerSamples(d, "", total=len(samples))
    spec = cfg.dataset
    model = cfg.model
    res.description = f"{model.source} model {model.name or model.factory or ''} on {spec.kind} dataset " \
                      f"{spec.name or spec.root or spec.factory or ''}".replace("  ", " ").strip()
    if spec.kind == "generated":
        from ..datasets import CLASS_NAMES

        res.class_names = list(CLASS_NAMES)
    keys = [k[len("maps/"):] for k in out.keys()]
    by_key: Dict[str, Tuple[Any, Any]] = {}
    for k in keys:
        method, _, layer = k.partition("/")
        if method not in res.methods:
            res.methods.append(method)
        if layer not in res.layers:
            res.layers.append(layer)
        idx, maps = out.maps(k)
        by_key[k] = ({int(i): r for r, i in enumerate(idx.tolist())}, maps)
    order = [str(x) for x in (cfg_dict.get("layers") or [])]  # the configuration's order: shallow to deep
    found = list(res.layers)
    res.layers = sorted(found, key=lambda n: (order.index(n) if n in order else len(order), found.index(n)))
    for pos, s in enumerate(keep):
        item = dataset[s.index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = torch.as_tensor(x).detach().float()
        if spec.mean is not None and spec.std is not None:
            x = unnormalize(x, spec.mean, spec.std)
        img = x.clamp(0, 1).permute(1, 2, 0).numpy() if x.dim() == 3 else np.repeat(x.numpy()[..., None], 3, -1)
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        mask = None
        if isinstance(item, (tuple, list)) and len(item) >= 3:
            mk = torch.as_tensor(item[2])
            if mk.dim() == 2 and tuple(mk.shape) == img.shape[:2]:
                mask = mk.bool().numpy()
        res.names.append(str(s.id))
        res.images.append(img)
        res.targets.append(int(s.target))
        res.predictions.append(int(s.prediction))
        res.masks.append(mask)
        for k, (rows, maps) in by_key.items():
            if s.index in rows:
                method, _, layer = k.partition("/")
                m = maps[rows[s.index]].double()
                while m.dim() > 2:
                    m = m.sum(0)
                res.maps[(pos, method, layer)] = m.numpy()
    return res
