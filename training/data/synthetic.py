"""Procedurally drawn "people" in Market-1501 layout, for tests, demos and quick experiments.

Identity shows in clothing colours, shirt pattern, hair, build and an optional bag; the camera
changes background, lighting, colour cast and scale; each image jitters position and pose. A small
model separates identities after a few CPU minutes, so a learning signal is testable without real data.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SPLITS = ("bounding_box_train", "query", "bounding_box_test")


@dataclass(frozen=True)
class _Identity:
    shirt: tuple
    shirt2: tuple
    pattern: int
    pants: tuple
    hair: tuple
    skin: tuple
    bag: int
    bag_colour: tuple
    build: float
    height: float


@dataclass(frozen=True)
class _Camera:
    background: tuple
    background2: tuple
    gain: float
    cast: tuple
    scale: float


def _colour(rng: np.random.Generator, sat=(0.5, 1.0), val=(0.3, 1.0)) -> tuple:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return int(r * 255), int(g * 255), int(b * 255)


def _identity(rng: np.random.Generator) -> _Identity:
    tone = rng.uniform(0.35, 0.95)
    return _Identity(
        shirt=_colour(rng), shirt2=_colour(rng), pattern=int(rng.integers(4)), pants=_colour(rng, val=(0.15, 0.8)),
        hair=_colour(rng, sat=(0.2, 0.8), val=(0.05, 0.6)),
        skin=(int(255 * tone), int(200 * tone), int(160 * tone)),
        bag=int(rng.integers(3)), bag_colour=_colour(rng), build=rng.uniform(0.8, 1.2), height=rng.uniform(0.88, 1.0),
    )


def _camera(rng: np.random.Generator) -> _Camera:
    return _Camera(
        background=_colour(rng, sat=(0.0, 0.4), val=(0.3, 0.9)), background2=_colour(rng, sat=(0.0, 0.4), val=(0.3, 0.9)),
        gain=rng.uniform(0.7, 1.25), cast=tuple(rng.uniform(0.85, 1.15, size=3)), scale=rng.uniform(0.78, 0.98),
    )


def draw_person(person: _Identity, cam: _Camera, rng: np.random.Generator, height: int = 128, width: int = 64) -> Image.Image:
    """One crop of ``person`` as seen by ``cam``."""
    img = Image.new("RGB", (width, height), cam.background)
    draw = ImageDraw.Draw(img)
    for y in range(0, height, 8):  # banded background: floor/wall texture of this camera
        if (y // 8) % 2:
            draw.rectangle([0, y, width, y + 3], fill=cam.background2)
    h = height * cam.scale * person.height * rng.uniform(0.95, 1.02)
    w = width * 0.42 * person.build * rng.uniform(0.95, 1.05)
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    top = height - h - rng.uniform(0, 0.04) * height
    head = h * 0.13
    draw.ellipse([cx - head * 0.55, top, cx + head * 0.55, top + head * 1.1], fill=person.skin)
    draw.pieslice([cx - head * 0.6, top - 1, cx + head * 0.6, top + head * 0.8], 180, 360, fill=person.hair)
    t0, t1 = top + head * 1.1, top + h * 0.55
    draw.rectangle([cx - w / 2, t0, cx + w / 2, t1], fill=person.shirt)
    if person.pattern == 1:  # horizontal stripes
        for y in np.arange(t0, t1, 6):
            draw.rectangle([cx - w / 2, y, cx + w / 2, y + 2], fill=person.shirt2)
    elif person.pattern == 2:  # vertical stripe down the middle
        draw.rectangle([cx - w / 8, t0, cx + w / 8, t1], fill=person.shirt2)
    elif person.pattern == 3:  # two-tone: lower half
        draw.rectangle([cx - w / 2, (t0 + t1) / 2, cx + w / 2, t1], fill=person.shirt2)
    spread = rng.uniform(0.0, 0.18) * w
    for side in (-1, 1):
        x = cx + side * w / 4
        draw.polygon([(x - w / 5, t1), (x + w / 5, t1), (x + w / 6 + side * spread, top + h), (x - w / 6 + side * spread, top + h)], fill=person.pants)
        draw.rectangle([cx + side * w / 2 - (w / 7 if side > 0 else 0), t0, cx + side * w / 2 + (0 if side > 0 else w / 7), t0 + (t1 - t0) * 0.9], fill=person.shirt)
    if person.bag:
        side = -1 if person.bag == 1 else 1
        bx = cx + side * w / 2
        draw.rectangle([min(bx, bx + side * w / 3), t0 + (t1 - t0) * 0.4, max(bx, bx + side * w / 3), t1 + (t1 - t0) * 0.2], fill=person.bag_colour)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8))), dtype=np.float32)
    arr = arr * cam.gain * np.asarray(cam.cast, dtype=np.float32) + rng.normal(0, 4.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_synthetic(
    out_dir: str | Path,
    identities: int = 40,
    cameras: int = 2,
    images_per_identity: int = 8,
    seed: int = 0,
    height: int = 128,
    width: int = 64,
    progress=None,
) -> dict[str, int]:
    """Write train/query/gallery folders; the first half of the identities train, the rest test.

    Each test identity gives one query image per camera; all its other images form the gallery.
    Returns the number of images written per split.
    """
    if identities < 2:
        raise ValueError(f"identities={identities}: need at least 2 (half train, half test)")
    if cameras < 2:
        # The Market-1501 protocol drops same-camera matches: with one camera no query has a match.
        raise ValueError(f"cameras={cameras}: need at least 2, since evaluation only counts matches from another camera")
    if min(height, width) < 8:
        raise ValueError(f"images of {height}x{width} pixels: give a height and width of at least 8")
    if images_per_identity < cameras + 1:
        raise ValueError(f"images_per_identity must be at least cameras + 1 = {cameras + 1} so queries have matches")
    out = Path(out_dir)
    for split in SPLITS:
        if (out / split).is_dir() and any((out / split).iterdir()):
            # the new set would mix with the old one, under counts that describe the new one only
            raise ValueError(f"{out / split} is not empty; give a new folder, or remove {out} first")
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cams = [_camera(rng) for _ in range(cameras)]
    num_train = identities // 2
    counts = dict.fromkeys(SPLITS, 0)
    steps = range(1, identities + 1)
    for pid in progress(steps) if progress else steps:
        person = _identity(rng)
        seen_cams: set[int] = set()
        for j in range(images_per_identity):
            cam = j % cameras + 1
            if pid <= num_train:
                split = "bounding_box_train"
            else:
                split = "query" if cam not in seen_cams else "bounding_box_test"
                seen_cams.add(cam)
            name = f"{pid:04d}_c{cam}s1_{j:06d}_00.jpg"
            draw_person(person, cams[cam - 1], rng, height, width).save(out / split / name, quality=90)
            counts[split] += 1
    return counts
