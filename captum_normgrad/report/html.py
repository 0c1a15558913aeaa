r"""A browsable, self-contained HTML report of an explain run (``captum-normgrad report``).

The report is a folder: ``index.html`` (page, style, script and data inlined; no network request)
and ``img/`` (the original images and every map overlaid on its **uncropped** image, as PNG). Open
``index.html`` in any browser, or copy the folder anywhere.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .run import ExplainRun, load_explain_run, score_run

__all__ = ["build_report"]


def _save_png(arr: np.ndarray, path: Path, max_side: int) -> None:
    from PIL import Image

    im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
    im.save(path, format="PNG")


def _summary(run: ExplainRun, cells: List[Dict[str, Any]], classes: List[str]) -> List[Dict[str, Any]]:
    out = []
    for m in run.methods:
        for layer in run.layers:
            sel = [c for c in cells if c["method"] == m and c["layer"] == layer]
            scored = [c for c in sel if c["hit"] is not None]
            rec: Dict[str, Any] = {"method": m, "layer": layer, "n": len(sel), "pointing": None, "energy": None,
                                   "per_class": {}}
            if scored:
                rec["pointing"] = float(np.mean([c["hit"] for c in scored]))
                rec["energy"] = float(np.mean([c["energy"] for c in scored]))
                for k in classes:
                    pc = [c for c in scored if c["class"] == k]
                    if pc:
                        rec["per_class"][k] = {"pointing": float(np.mean([c["hit"] for c in pc])),
                                               "energy": float(np.mean([c["energy"] for c in pc])), "n": len(pc)}
            out.append(rec)
    return out


def build_report(
    run_folder: Union[str, Path],
    out: Optional[Union[str, Path]] = None,
    masks: Optional[Union[str, Path]] = None,
    tolerance: float = 15,
    image_root: Optional[Union[str, Path]] = None,
    cmap: str = "viridis",
    alpha: float = 0.55,
    max_side: int = 320,
    title: Optional[str] = None,
    progress: bool = False,
) -> Path:
    r"""Write the HTML report of an explain run: image x method x layer, sortable, filterable, side by side.

    Every map is overlaid on its original, uncropped image
    (:func:`captum_normgrad.viz.overlay_map` with the run's preprocessing geometry). With ``masks``
    each map is scored by :func:`~captum_normgrad.report.score_run` (pointing hit, energy on the
    mask) and the summary gives pointing accuracy and mean energy per method and layer, and the
    pointing rate per class.

    Args:
        run_folder (str or Path): the ``--out`` folder of ``captum-normgrad explain``.
        out (str or Path, optional): report folder; ``RUN_FOLDER/report`` when None. Default: None
        masks (str or Path, optional): folder of object masks named like the images. Default: None
        tolerance (float, optional): pointing-game tolerance in model-input pixels. Default: 15
        image_root (str or Path, optional): folder of the original images, if moved. Default: None
        cmap (str, optional): colour map of the overlays. Default: ``"viridis"``
        alpha (float, optional): opacity of the maps. Default: 0.55
        max_side (int, optional): longest side of the written images in pixels. Default: 320
        title (str, optional): page title; from the run when None. Default: None
        progress (bool, optional): tqdm progress bar over images. Default: False

    Returns:
        Path: the written ``index.html``.

    Examples::

        >>> page = build_report("maps", masks="masks")
        >>> page.name
        'index.html'
    """
    from tqdm.auto import tqdm

    from ..io import load_image
    from ..viz import overlay_map

    run = load_explain_run(run_folder)
    if not run.rows:
        raise ValueError(f"{run.folder} explains no image (index.json lists none); nothing to report")
    dest = Path(out) if out is not None else run.folder / "report"
    img_dir = dest / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    scores = score_run(run, masks, tolerance) if masks is not None else {}
    geo = run.geometry()
    images: List[Dict[str, Any]] = []
    cells: List[Dict[str, Any]] = []
    for i, row in enumerate(tqdm(run.rows, desc="report", unit="img", disable=not progress)):
        photo = np.asarray(load_image(run.image_path(row, image_root)), dtype=np.float64) / 255.0
        thumb = f"img/{row['name']}.png"
        _save_png(photo, dest / thumb, max_side)
        target_name = row.get("target_name", f"class {row['target']}")
        images.append({
            "name": row["name"], "caption": run.caption(row), "target_name": target_name,
            "pred_name": row.get("pred_name", f"class {row['pred']}"), "prob_target": row["prob_target"],
            "correct": row["pred"] == row["target"], "thumb": thumb,
        })
        for method in run.methods:
            for layer in run.layers:
                heat = run.load_map(row, method, layer)
                src = f"img/{row['name']}__{method}__{layer}.png"
                _save_png(overlay_map(photo, heat, geo, cmap=cmap, alpha=alpha), dest / src, max_side)
                sc = scores.get((row["name"], method, layer), {})
                cells.append({"image": i, "method": method, "layer": layer, "src": src, "class": target_name,
                              "hit": sc.get("hit"), "energy": sc.get("energy"), "order": len(cells)})
    classes = sorted({im["target_name"] for im in images})
    has_scores = any(c["hit"] is not None for c in cells)
    data = {
        "methods": run.methods, "layers": run.layers, "images": images, "cells": cells, "classes": classes,
        "has_scores": has_scores, "tolerance": tolerance, "summary": _summary(run, cells, classes),
    }
    model = str(run.index.get("model", "model"))
    page_title = title or f"Saliency maps: {model}"
    meta = (f"{len(images)} image(s) \u00d7 {len(run.methods)} method(s) \u00d7 {len(run.layers)} layer(s); "
            f"target: {run.index.get('target', 'pred')}; run folder: {run.folder.name}")
    if has_scores:
        note = (f"Pointing: the map's maximum lies within {tolerance:g} px (model-input pixels) of the object mask. "
                "Energy: share of the map's positive mass on the mask. Both are computed on the part of the image "
                "the model saw (the crop); images without a mask are not scored.")
    else:
        note = "No masks were given (--masks DIR), so no localisation metric is shown."
    note += (" Maps are divided by their largest value and drawn over the original image; the darkened border is "
             "what the model's centre crop left out.")
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    from ._static import CSS, JS, PAGE

    page = (PAGE.replace("__CSS__", CSS).replace("__JS__", JS)
            .replace("__TITLE__", html.escape(page_title)).replace("__META__", html.escape(meta))
            .replace("__NOTE__", html.escape(note)).replace("__DATA__", payload))
    index = dest / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
