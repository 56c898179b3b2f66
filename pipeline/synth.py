"""`tubelet synth`: the embedded default dataset of captioned videos.

Real h264 mp4 files, written with PyAV: one coloured shape moving (and bouncing off the
edges) over a plain or textured background, in a spread of sizes, aspect ratios, durations
and frame rates. `captions.jsonl` holds one row per video: its relative `path`, a `caption`
("a red circle moving left on a dark background") and the ground truth (shape, colour,
direction, speed, per-frame bounding boxes) that quality evaluation reads later.

Each video is drawn from its own generator seeded by (seed, index), so the dataset is the
same for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.common.storage import StorageConfig, is_uri
from actors.common.video import write_mp4
from pipeline.config import output_store, writable_dir

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 210),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "dark": (22, 24, 30),
    "light": (225, 225, 215),
    "gray": (120, 120, 125),
}
TEXTURES = ("checkered", "striped", "cloudy", "gradient")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
DIRECTIONS: dict[str, tuple[float, float]] = {  # (dx, dy) in image coordinates (y down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
SPEEDS = {"slow": (0.15, 0.3), "fast": (0.45, 0.8)}  # frame widths per second


@dataclass
class SynthConfig:
    """Settings of `tubelet synth` (configs/synth/default.yaml)."""

    num_videos: int = 24
    seed: int = 0
    # (width, height) choices: 16:9, 9:16, 1:1, 2.35:1, 4:3, 3:4. Even, for yuv420p.
    sizes: list[tuple[int, int]] = field(
        default_factory=lambda: [
            (256, 144), (320, 180), (144, 256), (160, 160),
            (192, 192), (376, 160), (192, 144), (144, 192),
        ]
    )
    fps: list[int] = field(default_factory=lambda: [24, 25, 30])
    min_seconds: float = 1.0
    max_seconds: float = 3.0
    textured_fraction: float = 0.5
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    workers: int = 0  # processes; 0 = one per CPU
    # "shapes": a coloured shape over a background; "photos": a camera panning, zooming and
    # turning over a natural photo of scikit-image (pipeline/photos.py), from `photo_split`.
    kind: str = "shapes"
    photo_split: str = "train"  # "train" or "held-out": disjoint sets of photos
    # True: the shape bounces off the edges, so a long or fast video turns back and its caption
    # ("moving left") holds only until the first bounce. False: each video's start and speed
    # keep the whole path inside the frame (a speed too fast for the video's length is cut to
    # fit), so every frame moves the captioned way; what a text-to-video model should learn.
    bounce: bool = True
    # object-store access for an s3:// --output (actors/common/storage.py)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if self.kind not in ("shapes", "photos"):
            raise ValueError(f"kind: must be 'shapes' or 'photos', got {self.kind!r}")
        if self.photo_split not in ("train", "held-out"):
            raise ValueError(f"photo_split: must be 'train' or 'held-out', got "
                             f"{self.photo_split!r}")
        if self.num_videos < 1:
            raise ValueError(f"num_videos: must be >= 1, got {self.num_videos}")
        if not self.sizes:
            raise ValueError("sizes: must list at least one (width, height)")
        for w, h in self.sizes:
            if w < 32 or h < 32 or w % 2 or h % 2:
                raise ValueError(f"sizes: ({w}, {h}) must be even and at least 32x32")
        if not self.fps or any(f <= 0 for f in self.fps):
            raise ValueError(f"fps: must be positive frame rates, got {self.fps}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(
                f"min_seconds/max_seconds: need 0 < min <= max, got {self.min_seconds}, "
                f"{self.max_seconds}"
            )
        if not 0.0 <= self.textured_fraction <= 1.0:
            raise ValueError(f"textured_fraction: must be in [0, 1], got {self.textured_fraction}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf: must be in [0, 51], got {self.crf}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` inscribed in a square."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (x - c) / (size / 2), (y - c) / (size / 2)  # in [-1, 1]
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex up
        return (v >= -0.9) & (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
    if shape == "star":
        r = np.sqrt(u**2 + v**2)
        theta = np.arctan2(v, u) + math.pi / 2
        edge = 0.55 + 0.45 * np.abs(np.cos(2.5 * theta))  # five points
        return r <= edge
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def make_background(
    rng: np.random.Generator, width: int, height: int, textured: bool
) -> tuple[str, np.ndarray, tuple[int, int, int]]:
    """Returns (name, (H, W, 3) uint8 image, mean colour)."""
    if not textured:
        name = str(rng.choice(list(PLAIN_BACKGROUNDS)))
        img = np.empty((height, width, 3), np.uint8)
        img[:] = PLAIN_BACKGROUNDS[name]
        return name, img, PLAIN_BACKGROUNDS[name]
    name = str(rng.choice(TEXTURES))
    a = rng.integers(20, 110, size=3)  # two tones, dark-ish so bright shapes stand out
    b = np.clip(a + rng.integers(40, 90, size=3), 0, 255)
    y, x = np.mgrid[0:height, 0:width]
    if name == "checkered":
        cell = int(rng.integers(8, 24))
        t = ((x // cell + y // cell) % 2).astype(np.float32)
    elif name == "striped":
        period = float(rng.integers(10, 30))
        t = (np.sin((x + y) * 2 * math.pi / period) > 0).astype(np.float32)
    elif name == "cloudy":  # smooth value noise: coarse random grid, bilinear upsampling
        gh, gw = 1 + height // 24, 1 + width // 24
        coarse = rng.random((gh + 1, gw + 1)).astype(np.float32)
        fy, fx = y / height * gh, x / width * gw
        y0, x0 = fy.astype(int), fx.astype(int)
        wy, wx = fy - y0, fx - x0
        t = (coarse[y0, x0] * (1 - wy) * (1 - wx) + coarse[y0 + 1, x0] * wy * (1 - wx)
             + coarse[y0, x0 + 1] * (1 - wy) * wx + coarse[y0 + 1, x0 + 1] * wy * wx)
    else:  # gradient
        t = (x / max(width - 1, 1) * 0.5 + y / max(height - 1, 1) * 0.5).astype(np.float32)
    img = (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(np.uint8)
    mean = tuple(int(c) for c in img.reshape(-1, 3).mean(0))
    return name, img, mean  # type: ignore[return-value]


def _start(rng: np.random.Generator, room: float, path: float) -> float:
    """A start coordinate in [0, room] from which a signed `path` (pixels) stays inside."""
    if path == 0:
        return float(rng.uniform(0.2, 0.8) * room)
    lo, hi = (0.0, room - path) if path > 0 else (-path, room)
    return float(rng.uniform(lo, max(lo, hi)))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _contrast(c1: tuple[int, int, int], c2: tuple[int, int, int]) -> float:
    return float(np.abs(np.asarray(c1, float) - np.asarray(c2, float)).sum())


def render_video(cfg: SynthConfig, index: int, out_dir: Path) -> dict[str, Any]:
    """Draw and encode video `index`; returns its captions.jsonl row."""
    rng = np.random.default_rng([cfg.seed, index])
    width, height = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    fps = int(cfg.fps[int(rng.integers(len(cfg.fps)))])
    seconds = float(rng.uniform(cfg.min_seconds, cfg.max_seconds))
    num_frames = max(1, round(seconds * fps))
    if cfg.kind == "photos":
        from pipeline.photos import SPLITS, render_photo_video

        photos = SPLITS[cfg.photo_split]
        rel = f"photo_{index:05d}.mp4"
        row = render_photo_video(width, height, fps, num_frames,
                                 photos[int(rng.integers(len(photos)))], rng, out_dir / rel,
                                 cfg.crf, cfg.codec, cfg.preset)
        return {"path": rel, **row}
    textured = bool(rng.random() < cfg.textured_fraction)
    bg_name, background, bg_mean = make_background(rng, width, height, textured)
    colors = [c for c in COLORS if _contrast(COLORS[c], bg_mean) > 150] or list(COLORS)
    color = str(rng.choice(colors))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(list(DIRECTIONS)))
    speed_name = str(rng.choice(list(SPEEDS)))
    speed = float(rng.uniform(*SPEEDS[speed_name])) * width  # pixels per second
    size = int(rng.integers(int(0.22 * min(width, height)), int(0.4 * min(width, height)) + 1))
    mask = shape_mask(shape, size)
    rgb = np.asarray(COLORS[color], np.uint8)

    dx, dy = DIRECTIONS[direction]
    if cfg.bounce:  # start where the initial motion has room to show before the first bounce
        x = float(rng.uniform(0.3, 0.45) * (width - size)) if dx >= 0 else float(
            rng.uniform(0.55, 0.7) * (width - size))
        y = float(rng.uniform(0.3, 0.45) * (height - size)) if dy >= 0 else float(
            rng.uniform(0.55, 0.7) * (height - size))
        if dx == 0:
            x = float(rng.uniform(0.2, 0.8) * (width - size))
        if dy == 0:
            y = float(rng.uniform(0.2, 0.8) * (height - size))
    else:  # the whole path inside the frame: cap the speed, then start where it fits
        travel = (num_frames - 1) / fps  # seconds of motion
        rooms = [(width - size) / abs(dx) if dx else math.inf,
                 (height - size) / abs(dy) if dy else math.inf]
        if travel > 0:  # a one-frame video does not move
            speed = min(speed, 0.9 * min(rooms) / travel)
        x, y = (_start(rng, room, d * speed * travel)
                for room, d in ((width - size, dx), (height - size, dy)))
        speed_name = "fast" if speed >= SPEEDS["fast"][0] * width else "slow"
    vx, vy = dx * speed / fps, dy * speed / fps  # pixels per frame

    rel = f"video_{index:05d}.mp4"
    boxes: list[list[int]] = []

    def frames() -> Iterator[np.ndarray]:
        nonlocal x, y, vx, vy
        for _ in range(num_frames):
            x0, y0 = int(round(x)), int(round(y))
            frame = background.copy()
            frame[y0:y0 + size, x0:x0 + size][mask] = rgb
            boxes.append([x0, y0, x0 + size, y0 + size])
            yield frame
            x, y = x + vx, y + vy  # move, then bounce off the edges
            if not 0 <= x <= width - size:
                vx, x = -vx, min(max(x, 0.0), float(width - size))
            if not 0 <= y <= height - size:
                vy, y = -vy, min(max(y, 0.0), float(height - size))

    # one encoder thread: synthesize already runs one process per core
    write_mp4(out_dir / rel, frames(), fps, codec=cfg.codec, crf=cfg.crf, preset=cfg.preset,
              threads=1)

    return {
        "path": rel,
        "caption": f"{article(color)} {color} {shape} moving {direction} on a {bg_name} background",
        "shape": shape,
        "color": color,
        "background": bg_name,
        "textured": textured,
        "direction": direction,
        "speed": speed_name,
        "speed_px_per_s": round(speed, 2),
        "fps": fps,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "shape_size": size,
        "bboxes": boxes,  # per frame: [x0, y0, x1, y1), pixels
    }


def _render_chunk(args: tuple[SynthConfig, list[int], str]) -> list[dict[str, Any]]:
    cfg, indices, out_dir = args
    return [render_video(cfg, i, Path(out_dir)) for i in indices]


def synthesize(cfg: SynthConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """Write cfg.num_videos mp4 files and captions.jsonl to out_dir; returns the rows. An
    object-store `out_dir` (s3://...): rendered in a local temp folder, each file then
    uploaded whole (captions.jsonl last)."""
    if is_uri(out_dir):
        store = output_store(out_dir, cfg.storage)
        with tempfile.TemporaryDirectory(prefix="tubelet-synth-") as tmp:
            rows = synthesize(cfg, tmp)
            store.put_files(Path(tmp), sorted(Path(tmp).rglob("*.mp4"))
                            + [Path(tmp) / "captions.jsonl"])
        return rows
    out = Path(out_dir)
    writable_dir(out)
    workers = min(cfg.workers or os.cpu_count() or 1, cfg.num_videos)
    indices = list(range(cfg.num_videos))
    if workers <= 1:
        rows = _render_chunk((cfg, indices, str(out)))
    else:
        chunks = [indices[w::workers] for w in range(workers)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = [r for part in pool.map(_render_chunk, [(cfg, c, str(out)) for c in chunks])
                    for r in part]
        rows.sort(key=lambda r: r["path"])
    with open(out / "captions.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
