"""Procedural street-scene layouts: label maps of Cityscapes trainIds, the ground truth of the synthetic data.

Each scene's layout (:func:`scene_layout`) -- sky, buildings along a horizon, a perspective road with sidewalks,
vegetation, poles, cars and people -- depends only on ``(seed, index)``, drawn from
``np.random.default_rng([seed, index])``, never on the visual domain, so the same index has the same ground truth
in every domain (``fisherscan.data.synthetic`` paints it). To add a class, add it to :data:`CLASSES`, to the
colour and texture tables of ``synthetic`` and a ``_spawn_*`` function in :func:`scene_layout`.

All array operations are vectorised numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import FisherscanError

# ---------------------------------------------------------------------------------------------
# Label space
# ---------------------------------------------------------------------------------------------

ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 8, 10, 11, 13
IGNORE = 255

#: The trainIds (Cityscapes 19-class label space, 255 = ignore) that synthetic scenes use.
CLASSES = {0: "road", 1: "sidewalk", 2: "building", 5: "pole", 8: "vegetation", 10: "sky", 11: "person", 13: "car"}

# ---------------------------------------------------------------------------------------------
# Small numpy helpers
# ---------------------------------------------------------------------------------------------


def check_size(size) -> tuple[int, int]:
    """``(height, width)`` as ints, at least 16x16; a one-line FisherscanError otherwise."""
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise FisherscanError(f"synthetic scene size must be (height, width), got {size!r}") from None
    if h < 16 or w < 16:
        raise FisherscanError(f"synthetic scene size must be at least 16x16 pixels, got {h}x{w}")
    return h, w


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int = 0) -> np.ndarray:
    """Bilinearly upsampled standard-normal grid: low-frequency noise of about ``cells`` blobs per side."""
    h, w = shape
    extra = (channels,) if channels else ()
    grid = rng.standard_normal((cells + 1, cells + 1) + extra)
    gy = np.linspace(0.0, cells, h, endpoint=False) + 0.5 * cells / h
    gx = np.linspace(0.0, cells, w, endpoint=False) + 0.5 * cells / w
    y0 = np.minimum(gy.astype(int), cells - 1)
    x0 = np.minimum(gx.astype(int), cells - 1)
    fy = (gy - y0)[:, None]
    fx = (gx - x0)[None, :]
    if channels:
        fy, fx = fy[..., None], fx[..., None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def shift_image(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by (dy, dx) pixels (positive = down / right), zero-filled at the borders."""
    out = np.zeros_like(a)
    h, w = a.shape[:2]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[dst_y, dst_x] = a[src_y, src_x]
    return out


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of an (H, W) or (H, W, C) float image with edge padding."""
    if sigma <= 0:
        return img
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(t * np.take(padded, np.arange(i, i + n), axis=axis) for i, t in enumerate(taps))
    return img


def run_centres(mask: np.ndarray) -> np.ndarray:
    """For each True pixel, the centre column of the horizontal run of True pixels it belongs to."""
    h, w = mask.shape
    cols = np.broadcast_to(np.arange(w), (h, w))
    starts = mask & ~shift_image(mask, 0, 1)
    ends = mask & ~shift_image(mask, 0, -1)
    start = np.maximum.accumulate(np.where(starts, cols, -1), axis=1)
    end = w - 1 - np.maximum.accumulate(np.where(ends, w - 1 - cols, -1)[:, ::-1], axis=1)[:, ::-1]
    return (start + end) / 2.0


def hue_rotation(degrees: float) -> np.ndarray:
    """3x3 matrix rotating RGB colours about the grey axis (a hue rotation that keeps the mean of R, G, B)."""
    a = np.deg2rad(degrees)
    k = np.ones(3) / np.sqrt(3.0)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.cos(a) * np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * np.outer(k, k)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Street:
    """Perspective geometry shared by everything placed on the ground plane.

    ``depth(y)`` is 0 at the horizon and 1 at the bottom row: apparent sizes scale linearly with it.
    """

    h: int
    w: int
    horizon: float  # row of the horizon / vanishing point
    vanish_x: float  # column of the vanishing point
    bottom_x: float  # road centre at the bottom row
    road_half: float  # road half-width at the bottom row
    walk: float  # sidewalk width at the bottom row

    def depth(self, y):
        return np.clip((y - self.horizon) / (self.h - self.horizon), 0.0, 1.0)

    def row(self, depth):
        return self.horizon + depth * (self.h - self.horizon)

    def centre(self, depth):
        return self.vanish_x + (self.bottom_x - self.vanish_x) * depth

    def half_width(self, depth):
        return 0.01 * self.w + self.road_half * depth


@dataclass(frozen=True)
class _Thing:
    """An object standing on the ground: painted far-to-near so nearer things occlude farther ones."""

    depth: float
    label: int
    mask: np.ndarray = field(repr=False)


def _ellipse(ys, xs, cy, cx, ry, rx):
    """Boolean mask of the axis-aligned ellipse with centre (cy, cx) and radii (ry, rx)."""
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def _box(ys, xs, top, bottom, left, right):
    """Boolean mask of the rectangle top <= y < bottom, left <= x < right (pixel centres)."""
    return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def _paint_buildings(label, rng, st: _Street, ys, xs):
    """Rectangles of random width and height standing on the horizon, extending down to the ground."""
    sky_floor = 0.12 * st.h  # keep the top rows sky
    x = -rng.uniform(0.0, 0.1) * st.w
    while x < st.w:
        width = rng.uniform(0.08, 0.25) * st.w
        top = st.horizon - rng.uniform(0.15, 1.0) * (st.horizon - sky_floor)
        gap = rng.random() < 0.2  # an empty lot: sky above, vegetation below
        if not gap:
            label[_box(ys, xs, top, st.h, x, x + width)] = BUILDING
        x += width


def _paint_trees(label, rng, st: _Street, ys, xs):
    """Tree crowns (unions of ellipses) around the horizon, with a trunk down to the ground."""
    for _ in range(rng.integers(1, 5)):
        cx = rng.uniform(0.0, 1.0) * st.w
        ry = rng.uniform(0.06, 0.14) * st.h
        rx = rng.uniform(0.05, 0.12) * st.w
        cy = max(st.horizon - rng.uniform(0.0, 0.3) * st.h, 0.12 * st.h + ry)
        crown = np.zeros(label.shape, bool)
        for _ in range(3):
            crown |= _ellipse(
                ys, xs, cy + rng.uniform(-0.4, 0.4) * ry, cx + rng.uniform(-0.5, 0.5) * rx,
                ry * rng.uniform(0.6, 1.0), rx * rng.uniform(0.6, 1.0),
            )
        trunk = _box(ys, xs, cy, st.horizon + 0.05 * st.h, cx - 0.01 * st.w - 0.5, cx + 0.01 * st.w + 0.5)
        label[crown | trunk] = VEGETATION


def _paint_street(label, st: _Street, ys, xs):
    """The road as a perspective trapezoid from the vanishing point, with a sidewalk on each side."""
    d = st.depth(ys)
    below = ys >= st.horizon
    offset = np.abs(xs - st.centre(d))
    half = st.half_width(d)
    label[below & (offset < half + st.walk * d)] = SIDEWALK
    label[below & (offset < half)] = ROAD


def _sidewalk_x(rng, st: _Street, depth: float) -> float:
    """A column on a random side's sidewalk at the given depth."""
    side = rng.choice([-1.0, 1.0])
    across = st.half_width(depth) + rng.uniform(0.25, 0.75) * st.walk * depth
    return st.centre(depth) + side * across


def _spawn_poles(rng, st: _Street, ys, xs) -> list[_Thing]:
    """Thin vertical bars standing on the sidewalks, with a lamp arm on some."""
    things = []
    for _ in range(rng.integers(1, 4)):
        depth = rng.uniform(0.2, 0.9)
        base, x = st.row(depth), _sidewalk_x(rng, st, depth)
        height = min(rng.uniform(1.0, 1.5) * (st.h - st.horizon) * depth, base - 0.1 * st.h)
        half = max(0.5, 0.0125 * st.w * depth)
        mask = _box(ys, xs, base - height, base, x - half, x + half)
        if rng.random() < 0.5:  # a street-lamp arm reaching over the road
            reach = np.sign(st.centre(depth) - x) * 0.15 * st.w * depth
            lo, hi = sorted((x, x + reach))
            mask |= _box(ys, xs, base - height, base - height + 2 * half, lo, hi)
        things.append(_Thing(depth, POLE, mask))
    return things


def _spawn_cars(rng, st: _Street, ys, xs) -> list[_Thing]:
    """Cars on the road: a body box with a narrower cabin box on top, sized by depth."""
    things = []
    for _ in range(rng.integers(1, 4)):
        depth = rng.uniform(0.3, 0.95)
        base = st.row(depth)
        half_road = st.half_width(depth)
        x = st.centre(depth) + rng.uniform(-0.6, 0.6) * half_road
        width = rng.uniform(0.7, 0.9) * half_road
        body_h, cabin_h = rng.uniform(0.35, 0.5) * width, rng.uniform(0.25, 0.35) * width
        body = _box(ys, xs, base - body_h, base, x - width / 2, x + width / 2)
        cabin = _box(ys, xs, base - body_h - cabin_h, base - body_h + 0.5, x - 0.35 * width, x + 0.35 * width)
        things.append(_Thing(depth, CAR, body | cabin))
    return things


def _spawn_people(rng, st: _Street, ys, xs) -> list[_Thing]:
    """Pedestrians on the sidewalks: an elliptical body and a round head, sized by depth."""
    things = []
    for _ in range(rng.integers(1, 5)):
        depth = rng.uniform(0.3, 0.9)
        base, x = st.row(depth), _sidewalk_x(rng, st, depth)
        height = rng.uniform(0.7, 0.95) * st.half_width(depth)
        body = _ellipse(ys, xs, base - 0.42 * height, x, 0.42 * height, max(0.8, 0.16 * height))
        head = _ellipse(ys, xs, base - 0.9 * height, x, max(0.8, 0.1 * height), max(0.8, 0.09 * height))
        things.append(_Thing(depth, PERSON, body | head))
    return things


def scene_layout(seed: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """The label map of scene ``index``: a uint8 (H, W) array of trainIds from :data:`CLASSES`.

    Deterministic in ``(seed, index, size)`` (drawn from ``np.random.default_rng([seed, index])``)
    and independent of the visual domain. Sky on top, a horizon at a random height with buildings
    and trees along it, a perspective road with sidewalks at the bottom, and poles, cars and people
    standing on the ground, painted far to near.
    """
    h, w = check_size(size)
    rng = np.random.default_rng([int(seed), int(index)])
    ys = np.arange(h, dtype=np.float64)[:, None] + 0.5  # pixel centres, broadcast against xs
    xs = np.arange(w, dtype=np.float64)[None, :] + 0.5
    horizon = rng.uniform(0.32, 0.5) * h
    vanish_x = rng.uniform(0.35, 0.65) * w
    st = _Street(
        h=h, w=w, horizon=horizon, vanish_x=vanish_x,
        bottom_x=vanish_x + rng.uniform(-0.1, 0.1) * w,
        road_half=rng.uniform(0.28, 0.42) * w,
        walk=rng.uniform(0.14, 0.24) * w,
    )

    label = np.full((h, w), SKY, np.uint8)
    label[ys[:, 0] >= horizon] = VEGETATION  # verges and empty lots
    _paint_buildings(label, rng, st, ys, xs)
    _paint_trees(label, rng, st, ys, xs)
    _paint_street(label, st, ys, xs)
    things = _spawn_poles(rng, st, ys, xs) + _spawn_cars(rng, st, ys, xs) + _spawn_people(rng, st, ys, xs)
    for thing in sorted(things, key=lambda t: t.depth):
        label[thing.mask] = thing.label
    return label
