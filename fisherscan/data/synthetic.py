"""Procedural street scenes with labels: the built-in demo data and a small domain-generalisation benchmark.

Nothing is downloaded. Each scene is generated in two independent steps:

1. **Layout** (``fisherscan.data.scenes.scene_layout``): a label map of Cityscapes trainIds. It depends only
   on ``(seed, index)``, never on the visual domain, so the same index has the same ground truth in every
   domain.
2. **Appearance** (:func:`render_scene`): an RGB image painted from the layout in one visual
   domain (:data:`DOMAINS`). Every domain starts from the same clean rendering, whose randomness
   (per-scene colour jitter, noise fields, window grid, lane dashes) comes from the source domain's
   stream ``default_rng([seed, index, 0])``; the domain's own randomness (fog density, night lights,
   hue shift, blur strength, rain) comes from ``default_rng([seed, index, domain_id])``. The images
   of one index in two domains are therefore a paired view of one scene under a domain shift.

Styles (:data:`STYLES`): ``"source"`` is the clean synthetic style; ``"fog"`` blends towards grey-white, more
strongly higher up the image (further away); ``"night"`` is dark with a colour cast, sensor noise and
a few bright lights; ``"colour"`` rotates the class colours in hue and changes the textures;
``"blur"`` is a gaussian blur with haze and rain streaks; ``"rain"`` is overcast, wet (the ground mirrors what
stands above it) with dense streaks; ``"snow"`` covers the ground and the tops of things and has falling flakes;
``"toon"`` is a posterised, outlined game-like rendering. :data:`DOMAINS` are the first five.

To add a class, add it to ``scenes.CLASSES``, :data:`BASE_COLOURS`, the texture tables and a
``_spawn_*`` function in ``scenes.scene_layout``. To add a domain, append a :class:`_Domain` to
``_DOMAIN_LIST`` (ids are positions in that list, so append, never reorder).

All image operations are vectorised numpy; a 128x128 scene takes a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import FisherscanError
from .scenes import (
    BUILDING,
    CAR,
    PERSON,
    POLE,
    ROAD,
    SIDEWALK,
    SKY,
    VEGETATION,
    check_size,
    gaussian_blur,
    hue_rotation,
    run_centres,
    scene_layout,
    shift_image,
    smooth_noise,
)

#: Clean base colour (RGB in [0, 1]) of each class before per-scene jitter and texture.
BASE_COLOURS = {
    ROAD: (0.33, 0.33, 0.35),
    SIDEWALK: (0.63, 0.59, 0.55),
    BUILDING: (0.60, 0.47, 0.40),
    POLE: (0.28, 0.29, 0.31),
    VEGETATION: (0.22, 0.43, 0.16),
    SKY: (0.56, 0.72, 0.92),
    PERSON: (0.58, 0.26, 0.24),
    CAR: (0.22, 0.32, 0.66),
}
_UNKNOWN_COLOUR = (0.5, 0.5, 0.5)  # any other label value (e.g. 255) renders as flat grey

# Texture amplitudes per class: low-frequency mottling, per-pixel grain, and a colour tint that
# varies along the image columns (buildings) or with the centre column of each horizontal run of
# the class (cars, people: one colour per object), so objects differ without instance maps.
_MOTTLE = {ROAD: 0.06, SIDEWALK: 0.05, BUILDING: 0.08, POLE: 0.03, VEGETATION: 0.25, SKY: 0.04, PERSON: 0.05, CAR: 0.04}
_GRAIN = {ROAD: 0.07, SIDEWALK: 0.04, BUILDING: 0.04, POLE: 0.02, VEGETATION: 0.14, SKY: 0.01, PERSON: 0.03, CAR: 0.02}
_COLUMN_TINT = {BUILDING: 0.12}
_OBJECT_TINT = {PERSON: 0.30, CAR: 0.30}

# ---------------------------------------------------------------------------------------------
# Appearance
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """How the clean rendering is painted; the source domain uses the defaults."""

    hue_degrees: float = 0.0  # rotation of every class colour about the grey axis
    saturation: float = 1.0  # scale of every class colour's distance from grey
    texture_gain: float = 1.0  # scale of mottling and grain
    window_scale: float = 1.0  # scale of the building window grid and sidewalk tiles
    stripes: float = 0.0  # amplitude of a diagonal stripe pattern over everything
    stripe_period: float = 8.0
    stripe_angle: float = 0.0


def _lane_markings(layout: np.ndarray, ys, xs, rng) -> np.ndarray:
    """Dashed centre line of the road: the dashes lengthen towards the viewer like ground-plane stripes."""
    road = layout == ROAD
    h, w = layout.shape
    has = road.any(axis=1)
    left = road.argmax(axis=1)
    right = w - 1 - road[:, ::-1].argmax(axis=1)
    centre = (left + right + 1) / 2.0
    width = (right - left + 1).astype(np.float64)
    first = int(has.argmax()) if has.any() else h
    period = rng.uniform(2.0, 4.0) * h
    phase = rng.uniform(0.0, 2.0)
    dash = np.floor(period / (np.maximum(ys[:, 0] - first, 0.0) + 3.0) + phase) % 2 == 0
    rows = has & dash & (width >= 0.1 * w)
    line = np.abs(xs - centre[:, None]) < np.maximum(0.5, 0.015 * width[:, None])
    return road & line & rows[:, None]


def _render_clean(layout: np.ndarray, rng: np.random.Generator, style: _Style) -> np.ndarray:
    """Float (H, W, 3) image in [0, 1]: class colours with per-scene jitter and procedural texture.

    Every random draw happens here in a fixed order whatever the style, so all domains that start
    from this rendering share the scene's colours and noise fields.
    """
    h, w = layout.shape
    ys = np.arange(h, dtype=np.float64)[:, None]
    xs = np.arange(w, dtype=np.float64)[None, :]
    scale = min(h, w) / 128.0

    # Palette: base colour + per-scene jitter, then the style's hue rotation and saturation.
    palette = np.tile(np.asarray(_UNKNOWN_COLOUR), (256, 1))
    for cls, colour in BASE_COLOURS.items():
        palette[cls] = np.asarray(colour) + rng.normal(0.0, 0.04, 3)
    grey = palette.mean(axis=1, keepdims=True)
    palette = grey + style.saturation * (palette - grey)
    palette = palette @ hue_rotation(style.hue_degrees).T
    palette = np.clip(palette, 0.02, 0.98)

    # Random fields (always drawn, in this order).
    mottle = smooth_noise(rng, (h, w), cells=6)
    grain = rng.standard_normal((h, w))
    tint = smooth_noise(rng, (1, w), cells=max(2, w // 12), channels=3)[0]  # (W, 3)
    object_tint = smooth_noise(rng, (1, w), cells=max(2, w // 6), channels=3)[0]  # (W, 3)
    window_period = rng.uniform(5.0, 8.0, 2) * scale * style.window_scale
    window_phase = rng.uniform(0.0, 1.0, 2)
    window_colour = np.array([0.12, 0.15, 0.22]) + rng.normal(0.0, 0.03, 3)
    tile = rng.uniform(4.0, 7.0) * scale * style.window_scale
    markings = _lane_markings(layout, ys, xs, rng)
    stripe_field = np.sin(
        2 * np.pi * (xs * np.cos(style.stripe_angle) + ys * np.sin(style.stripe_angle)) / style.stripe_period
    )

    img = palette[layout]
    amp_mottle = np.zeros(256)
    amp_grain = np.zeros(256)
    amp_tint = np.zeros(256)
    for table, amp in ((_MOTTLE, amp_mottle), (_GRAIN, amp_grain), (_COLUMN_TINT, amp_tint)):
        for cls, value in table.items():
            amp[cls] = value
    gain = style.texture_gain
    img = img * (1.0 + gain * (amp_mottle[layout] * mottle + amp_grain[layout] * grain))[..., None]
    img = img + amp_tint[layout][..., None] * tint[None, :, :]
    for cls, amp in _OBJECT_TINT.items():
        mask = layout == cls
        centre = np.clip(run_centres(mask)[mask].astype(int), 0, w - 1)
        img[mask] += amp * object_tint[centre]

    # Class-specific structure.
    sky = layout == SKY
    brighten = np.broadcast_to(0.85 + 0.3 * ys / h, (h, w))  # brighter towards the horizon
    img[sky] *= brighten[sky][:, None]
    building = layout == BUILDING
    wy = ((ys / window_period[0] + window_phase[0]) % 1.0) < 0.5
    wx = ((xs / window_period[1] + window_phase[1]) % 1.0) < 0.5
    windows = building & wy & wx
    img[windows] = 0.35 * img[windows] + window_colour
    sidewalk = layout == SIDEWALK
    joints = sidewalk & ((ys % tile < 1.0) | (xs % tile < 1.0))
    img[joints] *= 0.8
    img[markings] = np.array([0.88, 0.88, 0.82])
    car = layout == CAR
    glass = car & ~shift_image(car, max(1, round(3 * scale)), 0)  # top rows of each car body/cabin
    img[glass] = 0.4 * img[glass] + 0.06
    tyres = car & ~shift_image(car, -max(1, round(2 * scale)), 0)  # bottom rows
    img[tyres] *= 0.3

    if style.stripes:
        img = img * (1.0 + style.stripes * stripe_field)[..., None]
    return np.clip(img, 0.0, 1.0)


@dataclass(frozen=True)
class _Domain:
    """A visual domain: how it restyles the clean rendering, and the shift applied afterwards.

    ``style(rng)`` returns the :class:`_Style` for the clean rendering; ``shift(img, layout, rng)``
    transforms the float image. Both use the domain's own generator.
    """

    name: str
    style: Callable[[np.random.Generator], _Style] = lambda rng: _Style()
    shift: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray] = lambda img, layout, rng: img


def _fog(img, layout, rng):
    """Blend towards a grey-white fog colour, more strongly higher in the image (further away)."""
    h = img.shape[0]
    distance = (1.0 - (np.arange(h) + 0.5) / h)[:, None, None]  # 1 at the top, 0 at the bottom
    distance = np.where((layout == SKY)[..., None], 1.0, distance)
    density = rng.uniform(1.4, 2.4)
    alpha = 1.0 - np.exp(-density * (0.25 + distance))
    fog = np.array([0.80, 0.81, 0.83]) + rng.normal(0.0, 0.02, 3)
    return img * (1.0 - alpha) + fog * alpha


def _night(img, layout, rng):
    """Low light with a colour cast, a dark sky, a few glowing lights and sensor noise."""
    h, w = layout.shape
    sodium, led = np.array([1.25, 0.9, 0.55]), np.array([0.7, 0.85, 1.25])
    mix = rng.uniform(0.0, 1.0)
    cast = mix * sodium + (1.0 - mix) * led
    out = img**1.3 * rng.uniform(0.22, 0.38) * cast
    out[layout == SKY] *= 0.35

    # Lights on buildings (lit windows), pole tops and cars (head / tail lights).
    lit = np.flatnonzero(np.isin(layout, (BUILDING, POLE, CAR)))
    n = min(len(lit), int(rng.integers(4, 11)))
    if n:
        where = rng.choice(lit, size=n, replace=False)
        cy, cx = np.divmod(where, w)
        sigma = rng.uniform(0.6, 2.0, n) * min(h, w) / 128.0
        strength = rng.uniform(0.6, 1.2, n)
        yy = np.arange(h)[None, :, None]
        xx = np.arange(w)[None, None, :]
        glow = strength[:, None, None] * np.exp(
            -((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (2 * sigma[:, None, None] ** 2)
        )
        out = out + glow.sum(axis=0)[..., None] * np.array([1.0, 0.85, 0.55])

    noise_level = rng.uniform(0.015, 0.035)
    out = out + noise_level * rng.standard_normal((h, w, 1)) + 0.5 * noise_level * rng.standard_normal((h, w, 3))
    return out


def _colour_style(rng):
    """Hue-rotated, more saturated class colours with different texture statistics and stripes."""
    return _Style(
        hue_degrees=rng.choice([-1.0, 1.0]) * rng.uniform(60.0, 180.0),
        saturation=rng.uniform(1.2, 1.7),
        texture_gain=rng.choice([rng.uniform(0.3, 0.6), rng.uniform(1.6, 2.5)]),
        window_scale=rng.uniform(0.6, 1.6),
        stripes=rng.uniform(0.05, 0.15),
        stripe_period=rng.uniform(4.0, 12.0),
        stripe_angle=rng.uniform(0.0, np.pi),
    )


def _colour_shift(img, layout, rng):
    """Per-channel tone curves on top of the restyled palette."""
    return np.clip(img, 0.0, 1.0) ** rng.uniform(0.8, 1.25, 3)


def _blur(img, layout, rng):
    """Gaussian blur, a light haze, then soft slanted rain streaks."""
    h, w = layout.shape
    scale = min(h, w) / 128.0
    out = gaussian_blur(img, rng.uniform(1.0, 2.0) * scale)
    haze = rng.uniform(0.08, 0.2)
    out = out * (1.0 - haze) + haze * np.array([0.7, 0.72, 0.75])

    drops = (rng.random((h, w)) < rng.uniform(0.002, 0.005)).astype(np.float64)
    length = max(2, int(rng.uniform(6.0, 12.0) * scale))
    slant = rng.uniform(-0.3, 0.3)
    streaks = sum(shift_image(drops, i, int(round(i * slant))) for i in range(length))
    streaks = np.clip(gaussian_blur(streaks, 0.6), 0.0, 1.0)
    return out + rng.uniform(0.1, 0.2) * streaks[..., None]


def _rain(img, layout, rng):
    """Overcast rain: a darker, bluish-grey desaturated light, wet ground that mirrors the sky and lights above it,
    dense thin near-vertical streaks and a little blur from water on the lens."""
    h, w = layout.shape
    scale = min(h, w) / 128.0
    grey = img.mean(axis=2, keepdims=True)
    out = (0.55 * img + 0.45 * grey) * rng.uniform(0.55, 0.75) * np.array([0.92, 0.97, 1.08])
    out[layout == SKY] = 0.45 * out[layout == SKY] + 0.55 * np.array([0.52, 0.55, 0.60])
    ground = np.isin(layout, (ROAD, SIDEWALK))
    reflection = out[::-1]  # wet ground mirrors what stands above it, smeared vertically
    reflection = gaussian_blur(reflection, 2.5 * scale)
    wet = rng.uniform(0.25, 0.45)
    out[ground] = (1.0 - wet) * out[ground] + wet * reflection[ground]
    drops = (rng.random((h, w)) < rng.uniform(0.01, 0.02)).astype(np.float64)
    length = max(3, int(rng.uniform(10.0, 18.0) * scale))
    slant = rng.uniform(-0.08, 0.08)
    streaks = sum(shift_image(drops, i, int(round(i * slant))) for i in range(length))
    streaks = np.clip(gaussian_blur(streaks, 0.4), 0.0, 1.0)
    out = out + rng.uniform(0.15, 0.25) * streaks[..., None]
    return gaussian_blur(out, rng.uniform(0.3, 0.7) * scale)


def _snow(img, layout, rng):
    """Snow: white cover on the ground and on the tops of things, a bright bluish-white cast, low contrast, and
    falling flakes of several sizes."""
    h, w = layout.shape
    scale = min(h, w) / 128.0
    out = 0.6 * img + 0.4 * np.array([0.86, 0.90, 0.97])
    cover = smooth_noise(rng, (h, w), 6) > rng.uniform(-0.6, -0.1)
    ground = np.isin(layout, (ROAD, SIDEWALK, VEGETATION)) & cover
    tops = (layout != SKY) & (shift_image((layout == SKY).astype(np.uint8), 1, 0) > 0)  # rows under open sky
    snowy = ground | tops
    out[snowy] = 0.25 * out[snowy] + 0.75 * np.array([0.95, 0.96, 0.99])
    flakes = (rng.random((h, w)) < rng.uniform(0.004, 0.01)).astype(np.float64)
    flakes = np.clip(gaussian_blur(flakes, rng.uniform(0.5, 1.2) * scale) * 6.0, 0.0, 1.0)
    return out * (1.0 - flakes[..., None]) + flakes[..., None] * 0.98


def _toon_style(rng):
    """Flat, saturated colours: a game-like rendering (the source style of the benchmark, as GTA5 is for VFMs)."""
    return _Style(saturation=rng.uniform(1.3, 1.6), texture_gain=rng.uniform(0.05, 0.2))


def _toon(img, layout, rng):
    """Posterised colours (a few levels per channel) with dark outlines along every object boundary."""
    levels = int(rng.integers(4, 7))
    out = np.round(np.clip(img, 0.0, 1.0) * (levels - 1)) / (levels - 1)
    edges = np.zeros(layout.shape, dtype=bool)
    for dy, dx in ((1, 0), (0, 1)):
        moved = shift_image(layout.astype(np.int16) + 1, dy, dx)
        edges |= (moved != layout.astype(np.int16) + 1) & (moved > 0)
    out[edges] = 0.08 * out[edges] + 0.02
    return out


_DOMAIN_LIST = (
    _Domain("source"),
    _Domain("fog", shift=_fog),
    _Domain("night", shift=_night),
    _Domain("colour", style=_colour_style, shift=_colour_shift),
    _Domain("blur", shift=_blur),
    _Domain("rain", shift=_rain),
    _Domain("snow", shift=_snow),
    _Domain("toon", style=_toon_style, shift=_toon),
)
_DOMAINS_BY_NAME = {d.name: (i, d) for i, d in enumerate(_DOMAIN_LIST)}

#: Every visual style, in domain-id order ("source" = 0 is the clean style every domain starts from).
STYLES = tuple(d.name for d in _DOMAIN_LIST)
#: The five domains of the demo and the proxy benchmark v1 (later styles are appended after them).
DOMAINS = STYLES[:5]


def _domain(name: str) -> tuple[int, _Domain]:
    """``(domain_id, spec)`` of a domain name; a one-line FisherscanError naming the choices otherwise."""
    if name not in _DOMAINS_BY_NAME:
        raise FisherscanError(f"unknown synthetic domain {name!r}: choose from {', '.join(STYLES)}")
    return _DOMAINS_BY_NAME[name]


def render_scene(layout: np.ndarray, domain: str, seed: int, index: int) -> np.ndarray:
    """The uint8 (H, W, 3) RGB image of a label map in one visual domain.

    The clean rendering (colours, textures) is drawn from ``default_rng([seed, index, 0])`` and so
    is shared by all domains; the domain's own randomness is drawn from
    ``default_rng([seed, index, domain_id])`` with ``domain_id = STYLES.index(domain)``.
    Label values outside :data:`CLASSES` render as flat grey.
    """
    domain_id, spec = _domain(domain)
    layout = np.asarray(layout)
    if layout.ndim != 2 or layout.dtype != np.uint8:
        raise FisherscanError(f"a scene layout must be a uint8 (H, W) array, got {layout.dtype} {layout.shape}")
    domain_rng = np.random.default_rng([int(seed), int(index), domain_id])
    style = spec.style(domain_rng)
    clean = _render_clean(layout, np.random.default_rng([int(seed), int(index), 0]), style)
    img = spec.shift(clean, layout, domain_rng)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_scene(seed: int, index: int, domain: str, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` in one domain: ``(rgb, label)``, uint8 arrays of shapes (H, W, 3) and (H, W)."""
    _domain(domain)
    label = scene_layout(seed, index, size)
    return render_scene(label, domain, seed, index), label


def write_dataset(
    root,
    *,
    domains=DOMAINS,
    images_per_domain: int = 32,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> dict[str, Path]:
    """Write the scenes as PNG folders in the generic layout and return ``{domain: root/domain}``.

    For each domain: ``root/<domain>/images/scene_00000.png`` (RGB) and
    ``root/<domain>/labels/scene_00000.png`` (uint8 trainIds, 255 = ignore). Scene ``i`` has the
    same label map in every domain.
    """
    domains = tuple(domains)
    for name in domains:
        _domain(name)
    if not domains:
        raise FisherscanError("write_dataset needs at least one domain")
    if int(images_per_domain) < 1:
        raise FisherscanError(f"images_per_domain must be at least 1, got {images_per_domain}")
    size = check_size(size)
    root = Path(root)
    folders = {name: root / name for name in domains}
    for folder in folders.values():
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
    for index in range(int(images_per_domain)):
        label = scene_layout(seed, index, size)
        name = f"scene_{index:05d}.png"
        for domain, folder in folders.items():
            Image.fromarray(render_scene(label, domain, seed, index)).save(folder / "images" / name)
            Image.fromarray(label).save(folder / "labels" / name)
    return folders
