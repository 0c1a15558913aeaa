"""A small explain run on the trained benchmark VGG, shared by test_report.py and test_browser.py.

Four generated single-object test images (64 px) padded with grey side bands to 64 x 80, so the
model's 64-px centre crop is exactly the original picture and the report must map the maps back
into the middle of the wider image; object masks at the padded size, named like the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from captum_normgrad import cli
from captum_normgrad.datasets import ShapesDataset
from captum_normgrad.explain import METHODS as EXPLAIN_METHODS
from captum_normgrad.models import weights_path

PAD = 8  # grey columns on each side
LAYERS = ("features.12", "features.19")
# a signed method too (gradient x activation summed over channels; its registry name is gradxact_sum
# where gradxact gives one map per channel)
METHODS = ("normgrad", "gradcam", "gradxact_sum" if "gradxact_sum" in EXPLAIN_METHODS else "gradxact")


def make_explain_run(root: Path, n: int = 4, extra_args: Tuple[str, ...] = ()) -> Dict[str, Path]:
    imgs, masks, out = root / "imgs", root / "masks", root / "maps"
    imgs.mkdir(parents=True)
    masks.mkdir()
    ds = ShapesDataset(n, split="test")
    for i in range(n):
        x, _, m = ds[i]
        a = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pad = np.full((64, 64 + 2 * PAD, 3), 128, np.uint8)
        pad[:, PAD:PAD + 64] = a
        mp = np.zeros((64, 64 + 2 * PAD), np.uint8)
        mp[:, PAD:PAD + 64] = m.numpy().astype(np.uint8) * 255
        Image.fromarray(pad).save(imgs / f"img{i}.png")
        Image.fromarray(mp).save(masks / f"img{i}.png")
    code = cli.main([
        "explain", str(imgs), "--model", "captum_normgrad.models:ShapesVGG", "--weights", str(weights_path("vgg")),
        "--image-size", "64", "--no-normalize", "--layer", ",".join(LAYERS), "--method", ",".join(METHODS),
        "--out", str(out), "--quiet", *extra_args,
    ])
    assert code == 0
    return {"imgs": imgs, "masks": masks, "maps": out}


def make_runner_run(root: Path, n: int = 6) -> Path:
    """A finished runner output: the benchmark VGG on n generated test images (which carry masks)."""
    import json

    from captum_normgrad.runner import load_config, run

    config = {
        "output": "maps_run", "batch_size": 4, "shard_size": 4, "threads": 1, "progress": False,
        "dataset": {"kind": "generated", "name": "shapes", "kwargs": {"num_images": n, "split": "test", "image_size": 64}},
        "model": {"source": "benchmark", "name": "vgg"},
        "layers": list(LAYERS),
        "methods": ["normgrad", {"method": "gradcam", "layers": [LAYERS[1]]}],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(json.dumps(config))
    run(load_config(root / "run.json"))
    return root / "maps_run"
