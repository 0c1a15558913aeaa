r"""A browsable, self-contained HTML report of a run (``captum-normgrad report``).

The report is a folder: ``index.html`` (page, style, script and data inlined; no network request)
and ``img/`` (the original images and every map overlaid on its **uncropped** image, as PNG). Open
``index.html`` in any browser, or copy the folder anywhere.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .run import load_explain_run, score_map, score_run
from .runner_run import read_runner_run

__all__ = ["build_report"]


def _save_png(arr: np.ndarray, path: Path, max_side: int) -> None:
    from PIL import Image

    im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
    im.save(path, format="PNG")


def _summary(methods: List[str], layers: List[str], cells: List[Dict[str, Any]],
             classes: List[str]) -> List[Dict[str, Any]]:
    out = []
    for m in methods:
        for layer in layers:
            sel = [c for c in cells if c["method"] == m and c["layer"] == layer]
            if not sel:
                continue
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


def _safe(name: str, k: int) -> str:
    """A file name for sample ``k`` (ids may hold slashes or spaces)."""
    return f"{k:05d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


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
    max_images: Optional[int] = 100,
) -> Path:
    r"""Write the HTML report of a run: image x method x layer, sortable, filterable, side by side.

    ``run_folder`` is the ``--out`` folder of ``captum-normgrad explain`` or the output folder of
    a dataset-scale run (``captum-normgrad run``; its images are taken again from the run's dataset,
    :func:`~captum_normgrad.report.read_runner_run`). Every map is overlaid on its image
    (:func:`captum_normgrad.viz.overlay_map`; for explain runs on the original, **uncropped** image
    with the run's preprocessing geometry). With object masks (``masks`` for an explain run; the
    dataset's own masks for a runner run, e.g. the generated datasets) each map gets its pointing hit
    and energy on the mask (:func:`~captum_normgrad.report.score_map`), and the summary gives the
    pointing accuracy and mean energy per method and layer, and the pointing rate per class.

    Args:
        run_folder (str or Path): an explain ``--out`` folder or a runner output folder.
        out (str or Path, optional): report folder; ``RUN_FOLDER/report`` when None. Default: None
        masks (str or Path, optional): folder of object masks named like the images (explain runs).
                    Default: None
        tolerance (float, optional): pointing-game tolerance in model-input pixels. Default: 15
        image_root (str or Path, optional): folder of the original images, if moved (explain runs).
                    Default: None
        cmap (str, optional): colour map of the overlays. Default: ``"viridis"``
        alpha (float, optional): opacity of the maps. Default: 0.55
        max_side (int, optional): longest side of the written images in pixels. Default: 320
        title (str, optional): page title; from the run when None. Default: None
        progress (bool, optional): tqdm progress bar over images. Default: False
        max_images (int, optional): runner runs: report the first N samples only (None: all);
                    explain runs are reported whole. Default: 100

    Returns:
        Path: the written ``index.html``.

    Examples::

        >>> page = build_report("maps", masks="masks")
        >>> page.name
        'index.html'
    """
    from tqdm.auto import tqdm

    from ..io import load_image
    from ..viz import check_style, overlay_map

    check_style(cmap, alpha)
    folder = Path(run_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such run folder: {str(run_folder)!r}")
    dest = Path(out) if out is not None else folder / "report"
    records: List[Dict[str, Any]] = []  # per image: name, image, target/pred names, prob, maps, geometry, scores
    if (folder / "run.json").is_file():
        if masks is not None:
            raise ValueError("--masks is for explain runs; a runner run takes its masks from its dataset")
        rs = read_runner_run(folder, max_images=max_images)
        names = rs.class_names
        for k in range(len(rs.names)):
            maps = {(m, layer): rs.maps[(k, m, layer)] for m in rs.methods for layer in rs.layers
                    if (k, m, layer) in rs.maps}
            scores = ({key: score_map(h, rs.masks[k], tolerance) for key, h in maps.items()}
                      if rs.masks[k] is not None and rs.masks[k].any() else {})
            t, p = rs.targets[k], rs.predictions[k]
            records.append({"name": rs.names[k], "image": rs.images[k], "prob": None, "geometry": None,
                            "target_name": names[t] if names and 0 <= t < len(names) else f"class {t}",
                            "pred_name": names[p] if names and 0 <= p < len(names) else f"class {p}",
                            "correct": t == p, "maps": maps, "scores": scores})
        methods, layers, model = rs.methods, rs.layers, rs.description
        shown = f"{len(rs.names)} of {rs.total} sample(s)" if len(rs.names) < rs.total else f"{rs.total} sample(s)"
        target = "runner"
    else:
        run = load_explain_run(folder)
        if not run.rows:
            raise ValueError(f"{run.folder} explains no image (index.json lists none); nothing to report")
        scored = score_run(run, masks, tolerance) if masks is not None else {}
        for row in run.rows:
            maps = {(m, layer): run.load_map(row, m, layer) for m in run.methods for layer in run.layers}
            records.append({
                "name": row["name"], "image_path": run.image_path(row, image_root), "prob": row["prob_target"],
                "geometry": run.geometry(), "target_name": row.get("target_name", f"class {row['target']}"),
                "pred_name": row.get("pred_name", f"class {row['pred']}"), "correct": row["pred"] == row["target"],
                "maps": maps, "scores": {key[1:]: v for key, v in scored.items() if key[0] == row["name"]},
            })
        methods, layers, model = run.methods, run.layers, str(run.index.get("model", "model"))
        shown = f"{len(run.rows)} image(s)"
        target = run.index.get("target", "pred")
    img_dir = dest / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    images: List[Dict[str, Any]] = []
    cells: List[Dict[str, Any]] = []
    for i, rec in enumerate(tqdm(records, desc="report", unit="img", disable=not progress)):
        photo = rec.get("image")
        if photo is None:
            photo = np.asarray(load_image(rec["image_path"]), dtype=np.float64) / 255.0
        stem = _safe(rec["name"], i)
        thumb = f"img/{stem}.png"
        _save_png(photo, dest / thumb, max_side)
        caption = rec["target_name"] + (f" (p={rec['prob']:.2f})" if rec["prob"] is not None else "")
        images.append({"name": rec["name"], "caption": caption, "target_name": rec["target_name"],
                       "pred_name": rec["pred_name"], "prob_target": rec["prob"], "correct": rec["correct"],
                       "thumb": thumb})
        for (method, layer), heat in rec["maps"].items():
            src = f"img/{stem}__{_safe(method, 0)[6:]}__{_safe(layer, 0)[6:]}.png"
            _save_png(overlay_map(photo, heat, rec["geometry"], cmap=cmap, alpha=alpha), dest / src, max_side)
            sc = rec["scores"].get((method, layer), {})
            cells.append({"image": i, "method": method, "layer": layer, "src": src, "class": rec["target_name"],
                          "hit": sc.get("hit"), "energy": sc.get("energy"), "order": len(cells)})
    classes = sorted({im["target_name"] for im in images})
    has_scores = any(c["hit"] is not None for c in cells)
    data = {
        "methods": methods, "layers": layers, "images": images, "cells": cells, "classes": classes,
        "has_scores": has_scores, "tolerance": tolerance, "summary": _summary(methods, layers, cells, classes),
    }
    page_title = title or f"Saliency maps: {model}"
    meta = (f"{shown} \u00d7 {len(methods)} method(s) \u00d7 {len(layers)} layer(s); "
            f"target: {target}; run folder: {folder.resolve().name}")
    if has_scores:
        note = (f"Pointing: the map's maximum lies within {tolerance:g} px (model-input pixels) of the object mask. "
                "Energy: share of the map's positive mass on the mask. Both are computed on the part of the image "
                "the model saw (the crop); images without a mask are not scored.")
    else:
        note = "No object masks (--masks DIR, or a dataset with masks), so no localisation metric is shown."
    note += " Maps are divided by their largest value and drawn over the image"
    note += ("; the darkened border is what the model's centre crop left out." if any(r["geometry"] for r in records)
             else ".")
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    from ._static import CSS, JS, PAGE

    page = (PAGE.replace("__CSS__", CSS).replace("__JS__", JS)
            .replace("__TITLE__", html.escape(page_title)).replace("__META__", html.escape(meta))
            .replace("__NOTE__", html.escape(note)).replace("__DATA__", payload))
    index = dest / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
