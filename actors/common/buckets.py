"""Resolution buckets: typed (resolution budget x aspect ratio x frame count) table + the rule.

The assignment rule, for a clip of W x H pixels (after rotation), lasting D seconds:
1. aspect ratio: the table's ratio nearest to W / H in log space (ties go to the first listed);
2. resolution: the largest resolution whose bucket (h, w) at that ratio the clip *covers*
   (W >= w and H >= h), so frames are only ever scaled down, then centre-cropped;
3. frame count: the largest of that resolution's counts (each 4k + 1, to suit a causal VAE
   with temporal factor 4) that fits in D once resampled to `target_fps`;
4. bucket sizes are multiples of `size_multiple` (VAE spatial factor x DiT patch size),
   h = round(sqrt(pixels / ratio) / m) * m and w = round(sqrt(pixels * ratio) / m) * m.
Long videos give several clips: starts every `clip_stride_seconds` (default: the clip
length, i.e. back to back), at most `max_clips_per_video`. Clips that are too small or too
short are skipped with a reason. The rule is a pure function: the same input, the same bucket.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Bucket:
    """One shape every VAE / DiT batch of this bucket has: (num_frames, height, width)."""

    resolution: str
    aspect_ratio: str
    height: int
    width: int
    num_frames: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.resolution}-{self.aspect_ratio}-{self.num_frames}f"


@dataclass
class Resolution:
    name: str  # e.g. "128px"
    pixels: int  # pixel budget h * w, e.g. 128 * 128
    batch_sizes: dict[int, int]  # frame count (4k + 1) -> batch size


@dataclass
class BucketConfig:
    target_fps: float = 8.0
    size_multiple: int = 16  # VAE spatial factor (8) x DiT patch size (2)
    temporal_factor: int = 4  # frame counts must be temporal_factor * k + 1
    aspect_ratios: list[str] = field(
        default_factory=lambda: ["9:16", "3:4", "1:1", "4:3", "16:9", "2.35:1"]
    )
    resolutions: list[Resolution] = field(
        default_factory=lambda: [Resolution("128px", 128 * 128, {9: 8, 17: 4, 33: 2})]
    )
    clip_stride_seconds: float = 0.0  # 0 = clip length (back-to-back clips)
    max_clips_per_video: int = 1

    def validate(self) -> None:
        if self.target_fps <= 0:
            raise ValueError(f"target_fps: must be > 0, got {self.target_fps}")
        if self.size_multiple < 1:
            raise ValueError(f"size_multiple: must be >= 1, got {self.size_multiple}")
        for ar in self.aspect_ratios:
            parse_ratio(ar)
        if not self.aspect_ratios:
            raise ValueError("aspect_ratios: must list at least one ratio such as '16:9'")
        if not self.resolutions:
            raise ValueError("resolutions: must list at least one resolution")
        names = [r.name for r in self.resolutions]
        if len(set(names)) != len(names):
            raise ValueError(f"resolutions: names must be unique, got {names}")
        for r in self.resolutions:
            if r.pixels < self.size_multiple**2:
                raise ValueError(f"resolutions.{r.name}.pixels: must be >= size_multiple^2")
            if not r.batch_sizes:
                raise ValueError(f"resolutions.{r.name}.batch_sizes: list frame counts")
            for frames, bs in r.batch_sizes.items():
                if frames < 1 or (frames - 1) % self.temporal_factor:
                    raise ValueError(
                        f"resolutions.{r.name}.batch_sizes: frame count {frames} must be "
                        f"{self.temporal_factor}k + 1 (e.g. 1, 5, 9, 17, 33)"
                    )
                if bs < 1:
                    raise ValueError(f"resolutions.{r.name}.batch_sizes.{frames}: must be >= 1")
        if self.clip_stride_seconds < 0:
            raise ValueError("clip_stride_seconds: must be >= 0 (0 = clip length)")
        if self.max_clips_per_video < 1:
            raise ValueError("max_clips_per_video: must be >= 1")


def parse_ratio(text: str) -> float:
    """'16:9' -> 1.777..., width over height."""
    try:
        w, h = (float(x) for x in text.split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect ratio {text!r}: expected 'W:H' with positive numbers") from None
    return w / h


@dataclass(frozen=True)
class ClipPlan:
    """One clip cut from one video: where it starts and which bucket it goes to."""

    id: str
    start: float  # seconds
    bucket: Bucket


def clip_id(path: str, start: float, bucket: Bucket) -> str:
    """Stable id from the source and the clip window."""
    key = f"{path}|{start:.4f}|{bucket.num_frames}|{bucket.height}x{bucket.width}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


class BucketTable:
    """All buckets of a config, and the assignment rule (module docstring)."""

    def __init__(self, cfg: BucketConfig):
        self.cfg = cfg
        self.ratios = [(ar, parse_ratio(ar)) for ar in cfg.aspect_ratios]
        self.resolutions = sorted(cfg.resolutions, key=lambda r: r.pixels)  # small -> large
        self.buckets: dict[str, Bucket] = {}
        for res in self.resolutions:
            for ar, _ in self.ratios:
                h, w = self.shape(res, ar)
                for frames, bs in sorted(res.batch_sizes.items()):
                    b = Bucket(res.name, ar, h, w, frames, bs)
                    self.buckets[b.name] = b

    def shape(self, res: Resolution, ar: str) -> tuple[int, int]:
        """(height, width) of resolution `res` at aspect ratio `ar`."""
        r, m = parse_ratio(ar), self.cfg.size_multiple
        h = max(m, round(math.sqrt(res.pixels / r) / m) * m)
        w = max(m, round(math.sqrt(res.pixels * r) / m) * m)
        return h, w

    def nearest_ratio(self, width: int, height: int) -> str:
        target = math.log(width / height)
        return min(self.ratios, key=lambda item: abs(math.log(item[1]) - target))[0]

    def frames_available(self, duration: float) -> int:
        """Frames at target_fps whose timestamps k / fps lie inside [0, duration)."""
        if duration <= 0:
            return 0
        return int(math.floor(duration * self.cfg.target_fps - 1e-6)) + 1

    def assign(self, path: str, width: int, height: int, duration: float
               ) -> tuple[list[ClipPlan], str | None]:
        """Clips of one video, or ([], reason) when it is too small or too short."""
        if width <= 0 or height <= 0:
            return [], f"no picture size ({width}x{height})"
        ar = self.nearest_ratio(width, height)
        fitting = [r for r in self.resolutions
                   if self.shape(r, ar)[0] <= height and self.shape(r, ar)[1] <= width]
        if not fitting:
            h, w = self.shape(self.resolutions[0], ar)
            return [], (f"too small: {width}x{height}, the smallest bucket at {ar} is "
                        f"{w}x{h} ({self.resolutions[0].name})")
        res = fitting[-1]
        available = self.frames_available(duration)
        counts = [f for f in sorted(res.batch_sizes) if f <= available]
        if not counts:
            need = min(res.batch_sizes)
            return [], (f"too short: {duration:.2f}s gives {available} frames at "
                        f"{self.cfg.target_fps:g} fps, the shortest bucket needs {need}")
        frames = counts[-1]
        h, w = self.shape(res, ar)
        bucket = self.buckets[Bucket(res.name, ar, h, w, frames, 0).name]
        length = frames / self.cfg.target_fps
        stride = self.cfg.clip_stride_seconds or length
        clips = []
        start = 0.0
        while len(clips) < self.cfg.max_clips_per_video:
            if self.frames_available(duration - start) < frames:
                break
            clips.append(ClipPlan(clip_id(path, start, bucket), round(start, 6), bucket))
            start += stride
        return clips, None


def shape_chunks(frames: list[np.ndarray], buckets: list[str], batch_sizes: dict[str, int]
                 ) -> Iterator[list[int]]:
    """Row indices in forward-sized chunks: one shape per chunk, at most the bucket's batch
    size (all rows of that shape when the bucket is unknown)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, f in enumerate(frames):
        groups[f.shape].append(i)
    for rows in groups.values():
        size = batch_sizes.get(buckets[rows[0]], len(rows))
        for lo in range(0, len(rows), size):
            yield rows[lo:lo + size]
