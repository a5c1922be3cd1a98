"""Embedded synthetic UDA dataset: procedurally drawn street scenes in two styles.

The SOURCE domain is written in the GTA5 layout (``gta5/images``, ``gta5/labels`` with raw
Cityscapes ids, plus a held-out ``gta5_val`` in the same layout) and the TARGET domain in the
Cityscapes layout (``cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/``), so the real
loaders read it unchanged. Scenes hold 12 of the 19 classes: road, sidewalk, building, fence,
pole, traffic light, traffic sign, vegetation, terrain, sky, person and car.

The two domains share the scene grammar but differ in appearance (palette shift, per-class
texture, blur, gain, illumination gradient, colour cast, gamma, noise) and in geometry
statistics (horizon height, building height, road width, object sizes and counts). One knob,
``style_strength`` in [0, 1], moves the target from the source distribution (0) to the most
distant style (1). Drawing uses numpy only; every image has its own random stream derived from
``(seed, split, index)``, so the output is byte-identical for the same parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from cossim_fast.data.datasets import DatasetError
from cossim_fast.data.labels import CLASS_NAMES, NUM_CLASSES, PALETTE, TRAINID_TO_CITYSCAPES_ID

#: Bumped whenever the drawing changes, so stale datasets are regenerated.
GENERATOR_VERSION = 1
DEFAULT_STYLE_STRENGTH = 0.3

ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 13,
)  # fmt: skip
#: Train ids that the generator draws.
SYNTHETIC_CLASSES: tuple[int, ...] = (
    ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR,
)  # fmt: skip

_MARKER = "synthetic_uda.json"
_IN_PROGRESS = ".synthetic_uda.incomplete"
_LOCK = ".synthetic_uda.lock"
_OWNED_DIRS = ("gta5", "gta5_val", "cityscapes")
_TRAIN_CITIES = ("synthbrook", "synthford", "synthham")
_VAL_CITIES = ("synthmoor", "synthvale")
# Stream ids of the four splits, mixed into every image's seed.
_SPLIT_STREAMS = {"source": 0, "source_val": 1, "target_train": 2, "target_val": 3}


@dataclass(frozen=True)
class _Geometry:
    """Scene statistics; ranges are (low, high) of uniform draws."""

    horizon: tuple[float, float]  # horizon row / image height
    building_height: tuple[float, float]  # building height / horizon row
    building_gap: float  # probability of a gap after each building
    road_width: tuple[float, float]  # road width at the bottom row / image width
    cars: tuple[float, float]
    persons: tuple[float, float]
    poles: tuple[float, float]
    trees: tuple[float, float]
    object_scale: float  # size multiplier of cars and persons
    terrain_prob: float  # probability of a terrain strip on each side of the road
    fence_prob: float


@dataclass(frozen=True)
class _Style:
    """Appearance statistics."""

    palette: tuple[tuple[float, float, float], ...]  # base colour per train id (0..1 RGB)
    class_jitter: float  # per-image, per-class colour offset amplitude
    instance_jitter: float  # per-object colour offset amplitude
    texture: float  # amplitude of per-class low-frequency texture
    blur: float  # blend weight of a 3x3 box blur
    gain: tuple[float, float]
    gradient: float  # amplitude of a vertical illumination gradient
    cast: float  # per-channel colour-cast amplitude
    gamma: float  # gamma = exp(U(-gamma, gamma))
    noise: float  # pixel noise sigma
    window_period: float  # building window grid period in pixels at 64 rows


def _palette(colors: dict[int, tuple[float, float, float]]) -> tuple[tuple[float, float, float], ...]:
    return tuple(colors.get(c, (0.0, 0.0, 0.0)) for c in range(NUM_CLASSES))


_SOURCE_GEOMETRY = _Geometry(
    horizon=(0.30, 0.45), building_height=(0.5, 1.0), building_gap=0.15, road_width=(0.55, 0.9),
    cars=(1, 4), persons=(1, 4), poles=(1, 3), trees=(0, 3), object_scale=1.0,
    terrain_prob=0.3, fence_prob=0.3,
)  # fmt: skip
# The target at style_strength 1; in between, every number is interpolated.
_FAR_GEOMETRY = _Geometry(
    horizon=(0.48, 0.62), building_height=(0.3, 0.7), building_gap=0.4, road_width=(0.35, 0.65),
    cars=(2, 6), persons=(0, 3), poles=(2, 5), trees=(2, 6), object_scale=1.6,
    terrain_prob=0.8, fence_prob=0.7,
)  # fmt: skip
_SOURCE_STYLE = _Style(
    palette=_palette({
        ROAD: (0.33, 0.33, 0.36), SIDEWALK: (0.64, 0.60, 0.56), BUILDING: (0.56, 0.44, 0.38),
        FENCE: (0.58, 0.56, 0.44), POLE: (0.46, 0.46, 0.50), LIGHT: (0.12, 0.12, 0.10),
        SIGN: (0.88, 0.80, 0.12), VEGETATION: (0.20, 0.46, 0.16), TERRAIN: (0.52, 0.68, 0.30),
        SKY: (0.56, 0.76, 0.96), PERSON: (0.72, 0.20, 0.26), CAR: (0.14, 0.24, 0.62),
    }),
    class_jitter=0.04, instance_jitter=0.06, texture=0.02, blur=0.0, gain=(0.95, 1.05),
    gradient=0.05, cast=0.0, gamma=0.0, noise=0.02, window_period=6.0,
)  # fmt: skip
# Adversarial far palette: warm sky, bluish buildings, road/sidewalk brightness swapped,
# car/person colours swapped, olive vegetation, dark poles.
_FAR_STYLE = _Style(
    palette=_palette({
        ROAD: (0.66, 0.62, 0.56), SIDEWALK: (0.30, 0.30, 0.34), BUILDING: (0.34, 0.46, 0.66),
        FENCE: (0.36, 0.25, 0.20), POLE: (0.12, 0.12, 0.12), LIGHT: (0.62, 0.62, 0.60),
        SIGN: (0.20, 0.48, 0.92), VEGETATION: (0.52, 0.50, 0.20), TERRAIN: (0.56, 0.40, 0.26),
        SKY: (0.96, 0.62, 0.30), PERSON: (0.14, 0.24, 0.62), CAR: (0.72, 0.20, 0.26),
    }),
    class_jitter=0.08, instance_jitter=0.10, texture=0.10, blur=1.0, gain=(0.65, 1.25),
    gradient=0.35, cast=0.12, gamma=0.3, noise=0.05, window_period=3.5,
)  # fmt: skip
# Per-class multiplier of the texture amplitude (rough surfaces and foliage most).
_TEXTURE_WEIGHT = np.ones(NUM_CLASSES, dtype=np.float32)
_TEXTURE_WEIGHT[[ROAD, VEGETATION, TERRAIN]] = 1.6
_TEXTURE_WEIGHT[[SKY, SIGN, LIGHT]] = 0.4


def _lerp(a: Any, b: Any, t: float) -> Any:
    if isinstance(a, tuple):
        return tuple(_lerp(x, y, t) for x, y in zip(a, b, strict=True))
    return a + (b - a) * t


_Params = TypeVar("_Params", _Geometry, _Style)


def _interpolate(source: _Params, far: _Params, t: float) -> _Params:
    fields = {
        f.name: _lerp(getattr(source, f.name), getattr(far, f.name), t) for f in dataclasses.fields(source)
    }
    return type(source)(**fields)


# --- drawing ----------------------------------------------------------------------------------


class _Canvas:
    """A train-id label map plus a per-pixel colour offset for per-object tints."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.label = np.full((h, w), SKY, dtype=np.uint8)
        self.tint = np.zeros((h, w, 3), dtype=np.float32)

    def paint(self, y0: int, x0: int, mask: np.ndarray, cls: int, tint: np.ndarray) -> None:
        """Paint ``mask`` (a box whose top-left is (y0, x0), clipped to the canvas)."""
        mh, mw = mask.shape
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + mh, self.h), min(x0 + mw, self.w)
        if ya >= yb or xa >= xb:
            return
        m = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
        self.label[ya:yb, xa:xb][m] = cls
        self.tint[ya:yb, xa:xb][m] = tint

    def rect(self, x0: float, y0: float, x1: float, y1: float, cls: int, tint: np.ndarray) -> None:
        xi0, yi0 = int(round(x0)), int(round(y0))
        xi1, yi1 = max(int(round(x1)), xi0 + 1), max(int(round(y1)), yi0 + 1)  # at least 1 px
        self.paint(yi0, xi0, np.ones((yi1 - yi0, xi1 - xi0), dtype=bool), cls, tint)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, cls: int, tint: np.ndarray) -> None:
        rx, ry = max(rx, 0.75), max(ry, 0.75)
        x0, y0 = int(np.floor(cx - rx)), int(np.floor(cy - ry))
        ys = np.arange(y0, int(np.ceil(cy + ry)) + 1)[:, None] + 0.5
        xs = np.arange(x0, int(np.ceil(cx + rx)) + 1)[None, :] + 0.5
        self.paint(y0, x0, ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0, cls, tint)


def _draw_scene(rng: np.random.Generator, h: int, w: int, geo: _Geometry, jitter: float) -> _Canvas:
    """Draw one street scene into a label map (train ids) and per-object tints."""
    c = _Canvas(h, w)

    def tint() -> np.ndarray:
        return rng.uniform(-jitter, jitter, 3).astype(np.float32)

    def count(r: tuple[float, float]) -> int:
        return int(rng.integers(int(round(r[0])), int(round(r[1])) + 1))

    no_tint = np.zeros(3, dtype=np.float32)
    hy = int(h * rng.uniform(*geo.horizon))
    depth = h - hy

    # Buildings stand on the horizon, left to right, with random gaps showing the sky.
    x = -rng.uniform(0, 0.1) * w
    while x < w:
        bw = rng.uniform(0.1, 0.3) * w
        if rng.random() > geo.building_gap:
            c.rect(x, hy - rng.uniform(*geo.building_height) * hy, x + bw, hy, BUILDING, tint())
        x += bw
    # Trees around the horizon, in front of the buildings (trunk + canopy, all vegetation).
    for _ in range(count(geo.trees)):
        tx, r = rng.uniform(0, w), rng.uniform(0.06, 0.14) * h
        base = hy + rng.uniform(0, 0.06) * h
        ty = base - rng.uniform(1.2, 2.0) * r
        tv = tint()
        c.rect(tx - max(r * 0.12, 0.5), ty, tx + max(r * 0.12, 0.5), base, VEGETATION, tv)
        c.ellipse(tx, ty, r * rng.uniform(0.8, 1.3), r, VEGETATION, tv)
    # Ground: sidewalk by default; a fence along the back edge of the sidewalk.
    c.rect(0, hy, w, h, SIDEWALK, no_tint)
    if rng.random() < geo.fence_prob:
        fx0 = rng.uniform(-0.2, 0.6) * w
        c.rect(fx0, hy - rng.uniform(0.04, 0.09) * h, fx0 + rng.uniform(0.25, 0.6) * w, hy + 1, FENCE, tint())

    # Road: a trapezoid from a vanishing point on the horizon to a bottom span; terrain strips
    # along its edges.
    vx = rng.uniform(0.3, 0.7) * w
    centre = vx + rng.uniform(-0.25, 0.25) * w
    half = 0.5 * rng.uniform(*geo.road_width) * w
    ys = np.arange(hy, h)[:, None] + 0.5
    t_rows = (ys - hy) / depth  # 0 at the horizon, 1 at the bottom row
    xs = np.arange(w)[None, :] + 0.5
    left = vx + t_rows * (centre - half - vx)
    right = vx + t_rows * (centre + half - vx)
    for side in (-1, 1):
        if rng.random() < geo.terrain_prob:
            strip = rng.uniform(0.04, 0.12) * w * t_rows
            band = (xs >= left - strip) & (xs < left) if side < 0 else (xs >= right) & (xs < right + strip)
            c.paint(hy, 0, band, TERRAIN, no_tint)
    c.paint(hy, 0, (xs >= left) & (xs < right), ROAD, no_tint)

    def road_span(y: float) -> tuple[float, float]:
        t = (y - hy) / depth
        return vx + t * (centre - half - vx), vx + t * (centre + half - vx)

    # Objects, painted far to near so nearer ones occlude: (base row, kind).
    objects = [(hy + rng.uniform(0.1, 1.0) * depth, "car") for _ in range(count(geo.cars))]
    objects += [(hy + rng.uniform(0.15, 1.0) * depth, "person") for _ in range(count(geo.persons))]
    objects += [(hy + rng.uniform(0.05, 0.9) * depth, "pole") for _ in range(count(geo.poles))]
    for base, kind in sorted(objects, key=lambda o: o[0]):
        t = (base - hy) / depth  # perspective scale
        lo, hi = road_span(base)
        if kind == "car":
            cw = t * geo.object_scale * rng.uniform(0.25, 0.4) * w
            cx = rng.uniform(lo + 0.3 * cw, max(hi - 0.3 * cw, lo + 0.3 * cw + 1))
            ch = cw * rng.uniform(0.35, 0.5)
            tv = tint()
            c.rect(cx - cw / 2, base - ch * 0.6, cx + cw / 2, base, CAR, tv)  # body
            c.rect(cx - cw * 0.3, base - ch, cx + cw * 0.3, base - ch * 0.6, CAR, tv)  # cabin
        elif kind == "person":
            ph = t * geo.object_scale * rng.uniform(0.25, 0.4) * h
            px = _off_road_x(rng, lo, hi, w, ph * 0.2)
            tv = tint()
            c.rect(px - ph * 0.13, base - ph * 0.82, px + ph * 0.13, base, PERSON, tv)
            c.ellipse(px, base - ph * 0.9, ph * 0.1, ph * 0.1, PERSON, tv)
        else:
            ph = max(t, 0.15) * rng.uniform(0.5, 0.8) * h
            px = _off_road_x(rng, lo, hi, w, 1.0)
            half_w = max(0.5, ph * 0.025)
            top = base - ph
            c.rect(px - half_w, top, px + half_w, base, POLE, no_tint)
            attachment = rng.random()
            if attachment < 0.4:
                s = max(1.5, ph * 0.12)
                c.rect(px - s, top, px + s, top + 1.4 * s, SIGN, no_tint)
            elif attachment < 0.7:
                s = max(1.0, ph * 0.06)
                c.rect(px - s, top, px + s, top + 3.2 * s, LIGHT, no_tint)
    return c


def _off_road_x(rng: np.random.Generator, lo: float, hi: float, w: int, margin: float) -> float:
    """An x on the sidewalk left or right of the road span [lo, hi) (falls back to anywhere)."""
    options = [(0.0, lo - margin), (hi + margin, float(w))]
    options = [(a, b) for a, b in options if b - a > 1.0]
    if not options:
        return float(rng.uniform(0, w))
    a, b = options[int(rng.integers(len(options)))]
    return float(rng.uniform(a, b))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Low-frequency noise ``h x w x 3``: a coarse normal grid, bilinearly upsampled."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw, 3)).astype(np.float32)
    fy, fx = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = fy.astype(np.int64), fx.astype(np.int64)
    wy, wx = (fy - y0)[:, None, None].astype(np.float32), (fx - x0)[None, :, None].astype(np.float32)
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _box_blur(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += p[dy : dy + h, dx : dx + w]
    return out / 9.0


def _render(rng: np.random.Generator, canvas: _Canvas, style: _Style) -> np.ndarray:
    """Colour a drawn scene in a style; returns ``H x W x 3`` uint8."""
    h, w = canvas.h, canvas.w
    lab = canvas.label
    palette = np.asarray(style.palette, dtype=np.float32)
    palette = palette + rng.uniform(-style.class_jitter, style.class_jitter, palette.shape).astype(np.float32)
    img = palette[lab] + canvas.tint

    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    # Building windows: a dark grid whose period scales with the image height.
    period = style.window_period * h / 64.0
    phase = rng.uniform(0, period, 2)
    windows = (((ys + phase[0]) % period) < period * 0.45) & (((xs + phase[1]) % period) < period * 0.5)
    img[(lab == BUILDING) & windows] *= 0.6
    # Sky brightens toward the horizon in both domains.
    img *= np.where(lab == SKY, 0.85 + 0.2 * ys / h, 1.0)[:, :, None]

    noise = _smooth_noise(rng, h, w, cell=max(2.0, h / 16.0))
    texture = 0.8 * noise[:, :, :1] + 0.2 * noise  # mostly brightness, a little hue
    img += style.texture * _TEXTURE_WEIGHT[lab][:, :, None] * texture
    if style.blur > 0:
        img = (1 - style.blur) * img + style.blur * _box_blur(img)
    direction = rng.choice([-1.0, 1.0])
    img *= (1.0 + direction * style.gradient * (ys / h - 0.5))[:, :, None]
    img *= rng.uniform(*style.gain)
    img += rng.uniform(-style.cast, style.cast, 3).astype(np.float32)
    img = np.clip(img, 0.0, 1.0) ** np.exp(rng.uniform(-style.gamma, style.gamma))
    img += rng.normal(0.0, style.noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def draw_sample(
    seed: int, stream: int, index: int, size: tuple[int, int], style_strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image H x W x 3 uint8, label H x W uint8 train ids)`` pair.

    ``stream`` 0/1 are the source style (train/val), 2/3 the target style; the pair depends
    only on ``(seed, stream, index, size, style_strength)``.
    """
    w, h = size
    rng = np.random.default_rng([seed, stream, index])
    t = 0.0 if stream < 2 else float(style_strength)
    geo = _interpolate(_SOURCE_GEOMETRY, _FAR_GEOMETRY, t)
    style = _interpolate(_SOURCE_STYLE, _FAR_STYLE, t)
    canvas = _draw_scene(rng, h, w, geo, style.instance_jitter)
    return _render(rng, canvas, style), canvas.label


# --- writing ----------------------------------------------------------------------------------


def _raw_id_palette() -> list[int]:
    """A 'P'-mode palette colouring raw Cityscapes ids like GTA5's label files."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    colors[TRAINID_TO_CITYSCAPES_ID[:NUM_CLASSES]] = PALETTE
    return colors.reshape(-1).tolist()


def _save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette is None:
        im = Image.fromarray(array)
    else:  # store the ids as palette indices (convert("P") would quantise them)
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
        im.putpalette(palette)
    im.save(path, format="PNG", compress_level=6)


def _write_split(
    root: Path, split: str, count: int, seed: int, size: tuple[int, int], strength: float, counts: np.ndarray
) -> None:
    stream = _SPLIT_STREAMS[split]
    id_palette = _raw_id_palette()
    cities = _VAL_CITIES if split == "target_val" else _TRAIN_CITIES
    for i in range(count):
        image, label = draw_sample(seed, stream, i, size, strength)
        counts += np.bincount(label.reshape(-1), minlength=256)[:NUM_CLASSES]
        raw = TRAINID_TO_CITYSCAPES_ID[label]
        if split in ("source", "source_val"):
            base = root / ("gta5" if split == "source" else "gta5_val")
            _save_png(base / "images" / f"{i:05d}.png", image)
            _save_png(base / "labels" / f"{i:05d}.png", raw, palette=id_palette)  # GTA5 labels are 'P'
        else:
            sub = "train" if split == "target_train" else "val"
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            base = root / "cityscapes"
            _save_png(base / "leftImg8bit" / sub / city / f"{stem}_leftImg8bit.png", image)
            _save_png(base / "gtFine" / sub / city / f"{stem}_gtFine_labelIds.png", raw)


def generate_synthetic_uda(
    root: str | Path,
    *,
    seed: int = 0,
    num_source: int = 1000,
    num_source_val: int = 200,
    num_target_train: int = 1000,
    num_target_val: int = 200,
    size: tuple[int, int] = (128, 64),
    style_strength: float = DEFAULT_STYLE_STRENGTH,
) -> dict[str, Path]:
    """Write a synthetic GTA5-style source and Cityscapes-style target dataset under ``root``.

    Layout: ``root/gta5`` (source train), ``root/gta5_val`` (held-out source, same layout),
    ``root/cityscapes`` (target ``train`` and ``val`` splits, with labels), ``root/README.txt``
    and ``root/synthetic_uda.json`` (parameters, class pixel shares; written last, it marks a
    complete dataset). If the marker matches the parameters, nothing is written. Otherwise
    earlier generated folders are replaced; folders of the same names that this generator
    did not write are never deleted (``DatasetError``).

    Returns the paths ``root``, ``source``, ``source_val``, ``target`` and ``info``.
    """
    root = Path(root)
    w, h = (int(v) for v in size)
    if w < 16 or h < 16:
        raise ValueError(f"size must be at least 16x16, got {size}")
    if not 0.0 <= style_strength <= 1.0:
        raise ValueError(f"style_strength must be in [0, 1], got {style_strength}")
    counts_wanted = {
        "source": num_source, "source_val": num_source_val,
        "target_train": num_target_train, "target_val": num_target_val,
    }  # fmt: skip
    if any(n < 1 for n in counts_wanted.values()):
        raise ValueError(f"every split needs at least one image, got {counts_wanted}")
    params = {
        "generator_version": GENERATOR_VERSION, "seed": int(seed), "size": [w, h],
        "style_strength": float(style_strength), **{f"num_{k}": int(n) for k, n in counts_wanted.items()},
    }  # fmt: skip
    paths = {
        "root": root,
        "source": root / "gta5",
        "source_val": root / "gta5_val",
        "target": root / "cityscapes",
        "info": root / _MARKER,
    }
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / _LOCK):  # several processes (DDP ranks) may call this at once
        if not _is_complete(root, params):
            _generate(root, params, counts_wanted, int(seed), (w, h), float(style_strength))
    return paths


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent callers must serialise themselves
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(root: Path, params: dict[str, object]) -> bool:
    marker = root / _MARKER
    if not marker.is_file() or (root / _IN_PROGRESS).exists():
        return False
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(previous, dict) and previous.get("params") == params


def _generate(
    root: Path,
    params: dict[str, object],
    counts_wanted: dict[str, int],
    seed: int,
    size: tuple[int, int],
    strength: float,
) -> None:
    marker = root / _MARKER
    ours = marker.is_file() or (root / _IN_PROGRESS).exists()
    existing = [root / d for d in _OWNED_DIRS if (root / d).exists()]
    if existing and not ours:
        raise DatasetError(
            f"refusing to overwrite {', '.join(map(str, existing))}: not written by the synthetic "
            f"generator (no {marker}); choose another root"
        )
    (root / _IN_PROGRESS).write_text("generation in progress\n")
    marker.unlink(missing_ok=True)
    for d in existing:
        shutil.rmtree(d)

    shares: dict[str, list[float]] = {}
    for domain, splits in (("source", ("source", "source_val")), ("target", ("target_train", "target_val"))):
        counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        for split in splits:
            _write_split(root, split, counts_wanted[split], seed, size, strength, counts)
        shares[domain] = (counts / counts.sum()).round(5).tolist()

    info = {
        "params": params,
        "classes": {CLASS_NAMES[c]: c for c in SYNTHETIC_CLASSES},
        "class_pixel_share": {
            domain: {CLASS_NAMES[c]: s[c] for c in SYNTHETIC_CLASSES} for domain, s in shares.items()
        },
        "layout": {
            "source": "gta5/images/<name>.png, gta5/labels/<name>.png (raw Cityscapes ids)",
            "source_val": "gta5_val/ (same layout, held-out source images)",
            "target": "cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/ (*_gtFine_labelIds.png)",
        },
    }
    (root / "README.txt").write_text(_readme(params, info))
    tmp = root / (_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)  # atomic: the marker exists only for a complete dataset
    (root / _IN_PROGRESS).unlink()


def _readme(params: dict[str, object], info: dict[str, object]) -> str:
    shares = info["class_pixel_share"]
    assert isinstance(shares, dict)
    lines = [
        "Synthetic UDA street scenes generated by cossim_fast.data.synthetic (numpy-drawn).",
        "",
        "source      gta5/      GTA5 layout: images/<name>.png, labels/<name>.png (raw Cityscapes ids)",
        "source_val  gta5_val/  same layout, held-out source-style images",
        "target      cityscapes/ Cityscapes layout: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png,",
        "                       gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
        "",
        "The target differs from the source in palette, texture, blur, lighting, colour cast, gamma,",
        "noise and scene geometry; style_strength (0..1) sets how far. Regenerate with",
        "cossim_fast.data.generate_synthetic_uda(root, **params).",
        "",
        "params: " + json.dumps(params, sort_keys=True),
        "",
        f"{'class':<15}{'source %':>10}{'target %':>10}",
    ]
    for c in SYNTHETIC_CLASSES:
        name = CLASS_NAMES[c]
        lines.append(f"{name:<15}{100 * shares['source'][name]:>10.2f}{100 * shares['target'][name]:>10.2f}")
    return "\n".join(lines) + "\n"
