"""Decode: one clip of a video -> uint8 frames (T, H, W, 3) at its bucket's size and frame rate.

`decode_clip` does the least work that gives the clip:
1. seek to the keyframe at or before the clip start (the container's index), not to 0;
2. decode forward and stop at the first frame at or past the clip's last target time;
3. resample to the target fps: target k is at `start + k / fps` and takes the latest source
   frame shown at or before it (nearest-previous; a frame repeats when the source is slower);
4. convert to RGB only the frames picked, scaling with swscale so the frame covers the
   bucket (s = max(width / W, height / H) on the shown size: non-square pixels are stretched
   by the sample aspect ratio; area filter down, bilinear up), then turn it by the display
   rotation and centre-crop to (height, width).
A video that ends before the clip is full (a truncated file, a header that overstates the
duration) raises ClipError: frames are never padded.

`DecodeStage` runs it per row of the bucket stage's clip plan; a failed clip becomes an
error row (stage "decode") and the other rows of the batch go on.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import pyarrow as pa
from av.video.reformatter import Interpolation, VideoReformatter

from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import is_uri
from actors.common.tensors import pack, with_columns
from actors.probe import (
    FIX,
    VideoRejected,
    pixel_limit,
    remote_source,
    sample_aspect,
    video_stream,
)


class ClipError(ValueError):
    """A clip that cannot be decoded from its video; the message is one line for the user."""


class _Resizer:
    """Decoded frame -> (height, width, 3) uint8 RGB: scale to cover, rotate, centre-crop."""

    def __init__(self, height: int, width: int, rotation: int, sar: float = 1.0):
        self.height, self.width, self.rotation = height, width, rotation % 360
        self.sar = sar  # on-screen width of a stored pixel / its height
        self.reformatter = VideoReformatter()  # keeps its swscale context between frames
        self.mirror: tuple[int, int, int, int] | None = None  # set from the first frame
        self.seen_first = False

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if not self.seen_first:
            self.seen_first = True
            self.mirror = mirrored_matrix(frame)
        turned = (self.mirror[0] == 0 if self.mirror is not None
                  else self.rotation % 180 == 90)
        shown_w = frame.width * self.sar  # stretch non-square pixels to the shown shape
        disp_w, disp_h = (frame.height, shown_w) if turned else (shown_w, frame.height)
        s = max(self.width / disp_w, self.height / disp_h)
        scaled_w = max(self.width, round(disp_w * s))
        scaled_h = max(self.height, round(disp_h * s))
        out_w, out_h = (scaled_h, scaled_w) if turned else (scaled_w, scaled_h)
        interpolation = Interpolation.AREA if s < 1 else Interpolation.BILINEAR
        rgb = self.reformatter.reformat(frame, out_w, out_h, "rgb24",
                                        interpolation=interpolation).to_ndarray()
        if self.mirror is not None:
            rgb = orient(rgb, *self.mirror)
        elif self.rotation:  # counter-clockwise, as the display matrix says
            rgb = np.rot90(rgb, self.rotation // 90)  # (scaled_h, scaled_w, 3)
        y0, x0 = (scaled_h - self.height) // 2, (scaled_w - self.width) // 2
        return rgb[y0:y0 + self.height, x0:x0 + self.width]


def mirrored_matrix(frame: av.VideoFrame) -> tuple[int, int, int, int] | None:
    """(a, b, c, d) of the frame's display matrix when it mirrors the picture (determinant
    < 0: phone front cameras, some editors), else None. The probe's `rotation` comes from
    FFmpeg's angle, which cannot express a mirror (a left-right mirror reads as "rotation of
    180"), so a mirrored frame is turned by its matrix instead. Only the 8 right-angle
    layouts (entries in {-1, 0, 1}) are honoured; any other matrix keeps the probe's angle."""
    sides = frame.side_data  # PyAV >= 15: a Mapping of Type -> SideData; before: a sequence
    for side in (sides.values() if hasattr(sides, "values") else sides):
        if side.type != av.sidedata.sidedata.Type.DISPLAYMATRIX:
            continue
        m = np.frombuffer(bytes(side), "<i4")
        if m.size < 9:
            return None
        a, b, c, d = (round(float(m[i]) / 65536) for i in (0, 1, 3, 4))
        if {a, b, c, d} <= {-1, 0, 1} and a * d - b * c == -1:
            return a, b, c, d
    return None


def orient(rgb: np.ndarray, a: int, b: int, c: int, d: int) -> np.ndarray:
    """The picture as shown under display matrix (a, b, c, d) = FFmpeg's matrix[0, 1, 3, 4]:
    a shown pixel (x', y') = (a x + c y, b x + d y) of the stored one (the convention under
    which FFmpeg's "rotation of k * 90 degrees" is `np.rot90(rgb, k)`)."""
    if b == 0:  # no transpose: flips only
        return rgb[::d, ::a]
    turned = rgb.transpose(1, 0, 2)  # x' from y, y' from x
    return turned[::b, ::c]


def _check_args(start: float, fps: float, num_frames: int, height: int, width: int,
                rotation: int) -> None:
    if not (math.isfinite(start) and start >= 0):
        raise ClipError(f"bad clip start {start!r}: must be a time >= 0 in seconds")
    if not (math.isfinite(fps) and fps > 0):
        raise ClipError(f"bad target fps {fps!r}: must be > 0")
    if num_frames < 1 or height < 1 or width < 1:
        raise ClipError(f"bad clip shape {num_frames}x{height}x{width}: all must be >= 1")
    if rotation % 90:
        raise ClipError(f"bad rotation {rotation!r}: must be a multiple of 90 degrees")


def decode_clip(path: str, start: float, fps: float, num_frames: int, height: int,
                width: int, rotation: int = 0, threads: int = 0,
                stats: dict[str, Any] | None = None,
                budget: DecodeBudget | None = None, fs: Any = None) -> np.ndarray:
    """uint8 (num_frames, height, width, 3): the clip of `path` starting at `start` seconds
    (from the first frame), resampled to `fps` (module docstring). rotation: the probe's
    counter-clockwise display rotation. threads: decoder threads (0 = FFmpeg's choice).
    stats, if given, gets "decoded" (frames out of the decoder), "converted" (frames
    scaled to RGB) and "restarts" (1 when a seek landed past the start and it re-read from 0).
    budget: wall seconds and decoder frames one clip may cost (a hostile stream that decodes
    forever, or thousands of frames before its start, becomes an error row, not a hang).
    fs: the filesystem of an object-store `path` (a URI): read through a buffered file with
    seeks, no local copy. Raises ClipError with a one-line reason."""
    _check_args(start, fps, num_frames, height, width, rotation)
    budget = (budget or DecodeBudget()).start()
    stats = stats if stats is not None else {}
    stats.update(decoded=0, converted=0, restarts=0)
    source = path
    if fs is not None and is_uri(path):  # an object-store video, read through a buffer
        try:
            source = remote_source(path, fs)
        except VideoRejected as e:
            raise ClipError(str(e)) from None
    try:
        return _decode(source, start, fps, num_frames, height, width, rotation, threads,
                       budget, stats)
    finally:
        if source is not path:
            source.close()


def _decode(path: Any, start: float, fps: float, num_frames: int, height: int, width: int,
            rotation: int, threads: int, budget: Any, stats: dict) -> np.ndarray:
    try:
        # FFmpeg's own interrupt: a single read that stalls (a hung mount) ends at the budget
        timeout = budget.seconds or None
        container = av.open(path, metadata_errors="ignore", timeout=(timeout, timeout))
    except av.error.ExitError:
        raise budget.out_of_time() from None
    except av.error.FFmpegError as e:
        raise ClipError(f"cannot open the video (FFmpeg: {e.strerror}); {FIX}") from None
    with container:
        try:
            stream = video_stream(container)
        except VideoRejected as e:
            raise ClipError(str(e)) from None
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        if budget.pixels:  # the decoder refuses a larger picture rather than allocating it
            stream.codec_context.options = pixel_limit(budget.pixels)
        targets = start + np.arange(num_frames) / fps
        resize = _Resizer(height, width, rotation, sample_aspect(stream))
        clip = _read(container, stream, targets, resize, stats, budget, seek=start > 0)
        if clip is None:  # the index sent us past the start: read from the beginning
            stats["restarts"] = 1
            clip = _read(container, stream, targets, resize, stats, budget, seek=True,
                         to_zero=True)
        assert clip is not None  # from the beginning, the first frame stands in for earlier
        return clip


@dataclass
class DecodeBudget:
    """What one clip may cost: wall seconds, frames out of the decoder, and the largest picture
    the decoder may allocate (pixels; a stream whose parameter sets grow past it mid-way,
    after the probe read its header, fails there instead of allocating it) (0 = no limit)."""

    seconds: float = 0.0
    frames: int = 0
    pixels: int = 0

    def start(self) -> _Spending:
        return _Spending(self, time.monotonic() + self.seconds if self.seconds > 0 else math.inf)


@dataclass
class _Spending:
    """One clip's budget, started: ClipError once it is spent."""

    budget: DecodeBudget
    deadline: float

    @property
    def seconds(self) -> float:
        return self.budget.seconds

    @property
    def frames(self) -> int:
        return self.budget.frames

    @property
    def pixels(self) -> int:
        return self.budget.pixels

    def check(self, decoded: int) -> None:
        if self.frames and decoded > self.frames:
            raise ClipError(f"decoding took more than {self.frames} frames for one clip "
                            f"(decode_budget.frames); the stream is hostile or far longer "
                            f"than its header says; {FIX}")
        if time.monotonic() > self.deadline:
            raise self.out_of_time()

    def out_of_time(self) -> ClipError:
        """Also what FFmpeg's own interrupt (av.error.ExitError, at the same deadline) means."""
        return ClipError(f"decoding took more than {self.seconds:g} s for one clip "
                         f"(decode_budget.seconds); {FIX}")


def _read(container: Any, stream: Any, targets: np.ndarray, resize: _Resizer,
          stats: dict[str, Any], budget: _Spending, seek: bool,
          to_zero: bool = False) -> np.ndarray | None:
    """Fill one frame per target time; None when a seek landed after the first target
    (unless to_zero: then the first frame also serves targets before it)."""
    tb = stream.time_base
    origin = stream.start_time or 0  # pts of the first frame, in time_base units
    rate = stream.average_rate or stream.guessed_rate
    period = 1.0 / float(rate) if rate else None
    # timestamps are rounded to the time base (1 ms in mkv): compare with that slack, but
    # never so much that a neighbouring frame could pass for this one
    eps = float(tb) + 1e-6
    if period:
        eps = min(eps, period / 4)
    if seek:
        offset = 0 if to_zero else math.floor(float(targets[0]) / tb)
        container.seek(origin + offset, stream=stream, backward=True)

    T = len(targets)
    out = np.empty((T, resize.height, resize.width, 3), np.uint8)
    k = 0
    prev, prev_t, last_converted = None, None, None

    def take(frame: av.VideoFrame) -> None:
        nonlocal k, last_converted
        if frame is not last_converted:  # a repeated frame is converted once
            out[k] = resize(frame)
            stats["converted"] += 1
            last_converted = frame
        else:
            out[k] = out[k - 1]
        k += 1

    try:
        for frame in container.decode(stream):
            stats["decoded"] += 1
            budget.check(stats["decoded"])
            if frame.pts is not None:
                t = float((frame.pts - origin) * tb)
            else:
                t = prev_t + (period or 0.0) if prev_t is not None else 0.0
            if prev is None and t > targets[0] + eps and seek and not to_zero:
                return None
            while k < T and t > targets[k] + eps:  # targets before this frame: the last one
                take(prev if prev is not None else frame)
            while k < T and t >= targets[k] - eps:  # targets at this frame's time
                take(frame)
            prev, prev_t = frame, t
            if k == T:  # the last target is reached: stop decoding
                return out
    except av.error.ExitError:
        raise budget.out_of_time() from None
    except av.error.FFmpegError as e:
        where = f"{prev_t:.2f}s" if prev_t is not None else "the start"
        over = (f", or a picture larger than decode_budget.pixels={budget.pixels}"
                if budget.pixels else "")
        raise ClipError(f"decoding failed after {where} (FFmpeg: {e.strerror}): corrupt or "
                        f"truncated data{over}; {FIX}") from None

    # the video ended: the last frame covers targets until it would be replaced
    end = 0.0
    if prev is not None:
        end = prev_t + (float(prev.duration * tb) if prev.duration else (period or 0.0))
        while k < T and targets[k] < end + eps:
            take(prev)
    if k < T:
        ends = f"{end:.2f}s" if prev is not None else "0s (no frames)"
        raise ClipError(
            f"the video ends at {ends} but the clip needs frames up to {targets[-1]:.2f}s "
            f"(truncated file, or a header that overstates the duration); {FIX}")
    return out


def _node_id() -> str:
    """The Ray node this actor runs on, or "local" outside Ray (never imports Ray itself)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


class DecodeStage:
    """Clip plan rows -> the clip's frames, packed (`frames` bytes + `frames_shape`).

    Resources: the `decode` entry of the job config (a CPU share per actor); set `threads`
    to the CPUs each actor may use (0 lets FFmpeg take every core of the node). Memory: a clip
    is T*H*W*3 bytes (33 x 128 x 128: 1.6 MB), so keep batch_size * that well under Ray
    Data's 128 MiB block target, and run it next to the VAE encode stage (decoded frames are
    ~100x the mp4's bytes).
    """

    READS = ("id", "path", "start", "fps", "num_frames", "height", "width", "rotation")
    # every input column passes through; decode_node: where the clip was decoded (the
    # summary counts clips per node; "local" outside Ray)
    WRITES = ("frames", "frames_shape", "decode_seconds", "decode_node")

    @classmethod
    def spec(cls, cfg: Any, errors_dir: Any, fs: Any = None) -> StageSpec:
        """From a clip config (`ClipConfig`): decoder threads, the decode budget, its
        `decode` pool; `fs`: the filesystem of object-store inputs."""
        return StageSpec("decode", cls, dict(errors_dir=errors_dir, threads=cfg.decode_threads,
                                             budget=cfg.decode_budget, fs=fs), cfg.decode)

    def __init__(self, errors_dir: Any = None, threads: int = 0,
                 budget: DecodeBudget | None = None, fs: Any = None):
        self.threads, self.budget, self.fs = threads, budget or DecodeBudget(), fs
        self.errors = ErrorSink(errors_dir, "decode")
        self.node = _node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "decode")
        keep: list[bool] = []
        clips: list[np.ndarray] = []
        seconds: list[float] = []
        for row in batch.select(list(self.READS)).to_pylist():
            t0 = time.perf_counter()
            try:
                clip = decode_clip(str(row["path"]), float(row["start"]), float(row["fps"]),
                                   int(row["num_frames"]), int(row["height"]),
                                   int(row["width"]), int(row["rotation"] or 0), self.threads,
                                   budget=self.budget, fs=self.fs)
            except ClipError as e:
                self.errors.add(str(row["path"]), str(e))
                keep.append(False)
                continue
            except Exception as e:  # never fail the job over one input
                self.errors.add(str(row["path"]), f"decode failed ({type(e).__name__}: {e}); "
                                f"{FIX}".splitlines()[0])
                keep.append(False)
                continue
            keep.append(True)
            clips.append(clip)
            seconds.append(time.perf_counter() - t0)
        out = batch.filter(pa.array(keep, pa.bool_()))
        columns = {**pack("frames", clips), "decode_seconds": pa.array(seconds, pa.float64()),
                   "decode_node": pa.array([self.node] * len(clips), pa.string())}
        self.errors.flush()
        return with_columns(out, columns)
