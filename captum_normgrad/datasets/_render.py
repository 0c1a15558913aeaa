"""Rendering of the generated ground-truth images (pure numpy, deterministic from a seed).

Every image is drawn from its own random stream ``numpy.random.default_rng([seed, kind, index])``
so an image depends only on ``(seed, kind, index)``: random access, any order, any number of
workers, same pixels.

An image is a cluttered background (a random base colour, a smooth low-frequency colour field,
distractor strokes, small distractor blobs and pixel noise) with one or two objects painted on
top. An object is a *silhouette* (disc, square, ring or cross, with a random size, position and rotation) filled with
a *texture* (stripes or dots in two random colours, or a solid colour). The class is a
combination of shape and texture, so neither the colour nor the shape alone tells the classes
apart:

==============  ==========  =========================
class           silhouette  texture
==============  ==========  =========================
striped_disc    disc        stripes
dotted_disc     disc        dots
striped_square  square      stripes
dotted_square   square      dots
ring            annulus     solid, stripes or dots
cross           plus sign   solid, stripes or dots
==============  ==========  =========================

All colours are drawn from the same distribution for every class, so the mean colour of an
object carries no class information. The mask of an object is its silhouette (texture gaps
included); distractors are drawn *behind* the objects, so masks are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import numpy as np

CLASS_NAMES: Tuple[str, ...] = (
    "striped_disc",
    "dotted_disc",
    "striped_square",
    "dotted_square",
    "ring",
    "cross",
)
NUM_CLASSES = len(CLASS_NAMES)

_SHAPE = ("disc", "disc", "square", "square", "ring", "cross")
_TEXTURE = ("stripes", "dots", "stripes", "dots", None, None)  # None: solid, stripes or dots at random

# streams: a different ``kind`` keeps single- and two-object images independent
_KIND_SINGLE = 1
_KIND_PAIR = 2


@dataclass(frozen=True)
class ObjectSpec:
    """Geometry and appearance of one object (all lengths in pixels)."""

    label: int
    cy: float
    cx: float
    radius: float
    angle: float
    texture: str
    period: float
    colour_a: Tuple[float, float, float]
    colour_b: Tuple[float, float, float]


def _bounding_radius(label: int, radius: float) -> float:
    """Radius of a disc that contains the object whatever its rotation."""
    shape = _SHAPE[label]
    if shape == "square":
        return 0.82 * radius * np.sqrt(2.0)
    if shape == "cross":
        return radius * float(np.hypot(1.0, 0.3))
    return radius


def _random_colour_pair(rng: np.random.Generator, background: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Two contrasting colours, the first also contrasting with the background colour."""
    while True:
        a = rng.uniform(0.0, 1.0, 3)
        b = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(a - b) > 0.6 and np.linalg.norm(a - background) > 0.35:
            return a, b


def _object_spec(
    rng: np.random.Generator, label: int, cy: float, cx: float, radius: float, background: np.ndarray
) -> ObjectSpec:
    texture = _TEXTURE[label]
    if texture is None:
        texture = ("solid", "stripes", "dots")[int(rng.integers(3))]
    a, b = _random_colour_pair(rng, background)
    return ObjectSpec(
        label=label,
        cy=cy,
        cx=cx,
        radius=radius,
        angle=float(rng.uniform(0.0, np.pi)),
        texture=texture,
        period=float(rng.uniform(4.5, 6.5)),
        colour_a=tuple(float(v) for v in a),  # type: ignore[arg-type]
        colour_b=tuple(float(v) for v in b),  # type: ignore[arg-type]
    )


def _silhouette(spec: ObjectSpec, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dy, dx = yy - spec.cy, xx - spec.cx
    c, s = np.cos(spec.angle), np.sin(spec.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    r = spec.radius
    shape = _SHAPE[spec.label]
    if shape == "disc":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.82 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise AssertionError(shape)  # pragma: no cover


def _texture_is_a(spec: ObjectSpec, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean field: True where the texture shows colour A (else colour B)."""
    if spec.texture == "solid":
        return np.ones(yy.shape, dtype=bool)
    # the texture has its own orientation and phase, independent of the silhouette's
    t_angle = rng.uniform(0.0, np.pi)
    phase = rng.uniform(0.0, 1.0, 2)
    c, s = np.cos(t_angle), np.sin(t_angle)
    u = (c * xx + s * yy) / spec.period + phase[0]
    if spec.texture == "stripes":
        return np.mod(u, 1.0) < 0.5
    v = (-s * xx + c * yy) / spec.period + phase[1]
    du, dv = np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5
    return du * du + dv * dv <= 0.3**2  # dot radius 0.3 period


@lru_cache(maxsize=8)
def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) linear-interpolation weights, node k at pixel centre k * (size - 1) / (coarse - 1)."""
    pos = np.arange(size) * (coarse - 1) / (size - 1)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - lo
    w = np.zeros((size, coarse))
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] = frac
    return w


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    base = rng.uniform(0.2, 0.8, 3)
    coarse = rng.normal(0.0, 0.12, (3, 5, 5))
    up = _upsample_matrix(size, 5)
    img = base[:, None, None] + up @ coarse @ up.T  # smooth low-frequency colour field
    # distractor strokes: thin random segments in random colours
    for _ in range(int(rng.integers(4, 9))):
        p0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(8, 28)
        p1 = p0 + length * np.array([np.sin(ang), np.cos(ang)])
        width = rng.uniform(0.8, 1.8)
        colour = rng.uniform(0.0, 1.0, 3)
        # only the stroke's bounding box needs the point-to-segment distance
        y0, x0 = np.floor(np.minimum(p0, p1) - width).astype(int).clip(0, size)
        y1, x1 = np.ceil(np.maximum(p0, p1) + width).astype(int).clip(0, size)
        by, bx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        d = p1 - p0
        t = np.clip(((by - p0[0]) * d[0] + (bx - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
        dist2 = (by - p0[0] - t * d[0]) ** 2 + (bx - p0[1] - t * d[1]) ** 2
        on = dist2 <= (width / 2) ** 2
        patch = img[:, y0:y1, x0:x1]
        patch[:, on] = colour[:, None]
    # distractor blobs: small solid ellipses (clutter that is neither a stroke nor an object)
    for _ in range(int(rng.integers(1, 4))):
        c = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(1.5, 3.5, 2)
        colour = rng.uniform(0.0, 1.0, 3)
        y0, x0 = np.floor(c - 4).astype(int).clip(0, size)
        y1, x1 = np.ceil(c + 4).astype(int).clip(0, size)
        on = ((yy[y0:y1, x0:x1] - c[0]) / ry) ** 2 + ((xx[y0:y1, x0:x1] - c[1]) / rx) ** 2 <= 1.0
        patch = img[:, y0:y1, x0:x1]
        patch[:, on] = colour[:, None]
    return img, base


@lru_cache(maxsize=8)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy, xx = yy + 0.5, xx + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img + 0.04 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _paint(img: np.ndarray, spec: ObjectSpec, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mask = _silhouette(spec, yy, xx)
    is_a = _texture_is_a(spec, yy, xx, rng)
    a = np.asarray(spec.colour_a)[:, None, None]
    b = np.asarray(spec.colour_b)[:, None, None]
    painted = np.where(is_a[None], a, b)
    img[:, mask] = painted[:, mask]
    return mask


def render_single(seed: int, index: int, size: int = 64) -> Tuple[np.ndarray, int, np.ndarray, List[ObjectSpec]]:
    """One single-object image: ``(image (3, H, W) float32 in [0, 1], label, mask (H, W) bool, specs)``."""
    rng = np.random.default_rng([seed, _KIND_SINGLE, index])
    scale = size / 64.0
    yy, xx = _grid(size)
    img, base = _background(rng, size, yy, xx)
    label = int(rng.integers(NUM_CLASSES))
    radius = rng.uniform(11.0, 16.0) * scale
    br = _bounding_radius(label, radius) + 1.0
    cy, cx = rng.uniform(br, size - br, 2)
    spec = _object_spec(rng, label, float(cy), float(cx), float(radius), base)
    mask = _paint(img, spec, yy, xx, rng)
    return _finish(img, rng), label, mask, [spec]


def render_pair(seed: int, index: int, size: int = 64) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[ObjectSpec]]:
    """One two-object image with two different classes and disjoint masks.

    Returns ``(image (3, H, W), labels (2,) int64, masks (2, H, W) bool, specs)``.
    """
    rng = np.random.default_rng([seed, _KIND_PAIR, index])
    scale = size / 64.0
    yy, xx = _grid(size)
    img, base = _background(rng, size, yy, xx)
    labels = rng.choice(NUM_CLASSES, size=2, replace=False)
    radii = rng.uniform(9.0, 12.5, 2) * scale
    brs = [_bounding_radius(int(lab), r) + 1.0 for lab, r in zip(labels, radii)]
    gap = 3.0 * scale
    for _ in range(1000):
        c0 = rng.uniform(brs[0], size - brs[0], 2)
        c1 = rng.uniform(brs[1], size - brs[1], 2)
        if np.linalg.norm(c0 - c1) >= brs[0] + brs[1] + gap:
            break
    else:  # pragma: no cover - geometry always leaves room at these sizes
        raise RuntimeError("could not place two objects without overlap")
    masks = []
    specs = []
    for lab, r, c in zip(labels, radii, (c0, c1)):
        spec = _object_spec(rng, int(lab), float(c[0]), float(c[1]), float(r), base)
        masks.append(_paint(img, spec, yy, xx, rng))
        specs.append(spec)
    return _finish(img, rng), labels.astype(np.int64), np.stack(masks), specs
