"""Probe: what each input video is, read from its headers alone (no frame is decoded).

For each `path` it writes the display size (non-square pixels stretched by the header's
sample aspect ratio, then rotation applied), frame rate, duration, rotation,
codec and frame count that the bucket stage needs, and refuses, as one error row each, what
cannot be a usable video: a missing path, a folder, an empty or unreadable file, a file with
no video stream (audio only, text, noise), a header with no usable size, rate or duration,
and a header claiming a picture so large that decoding it could exhaust memory.

`avformat_find_stream_info` (inside `av.open`) may itself decode a frame or two for some
codecs to fill in missing parameters; we never do.

Rotation: PyAV 18 has no reader for a stream's display matrix (only `VideoFrame.rotation`,
after decoding), so it is read from FFmpeg's own header dump (`av_dump_format`, captured
through PyAV's log capture), or from the legacy `rotate` metadata tag where a demuxer still
sets it. The `rotation` column is counter-clockwise degrees in {0, 90, 180, 270}, the
convention of PyAV's `VideoFrame.rotation` / `VideoStream.set_display_rotation`: turning the
decoded frame that far counter-clockwise (`np.rot90(frame, rotation // 90)`) gives the
picture as players show it.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import av
import av.logging
import pyarrow as pa

from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import is_uri, open_source, storage_reason
from actors.common.tensors import with_columns

FIX = "remove it from the input or fix the file"

OUTPUT_TYPES: dict[str, pa.DataType] = {
    "width": pa.int64(),  # display size, after rotation
    "height": pa.int64(),
    "fps": pa.float64(),
    "duration": pa.float64(),  # seconds
    "rotation": pa.int64(),  # counter-clockwise degrees, 0 / 90 / 180 / 270
    "codec": pa.string(),
    "num_frames": pa.int64(),
}


class VideoRejected(ValueError):
    """An input that is not a usable video; the message is one line for the user."""


@contextmanager
def _ffmpeg_log(level: int = av.logging.INFO) -> Iterator[list]:
    """Capture FFmpeg's log lines of this thread (PyAV drops them all by default)."""
    previous = av.logging.get_level()
    av.logging.set_level(level)
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        av.logging.set_level(previous)


def pixel_limit(pixels: int) -> dict[str, str]:
    """FFmpeg decoder options that refuse a picture over `pixels` instead of allocating it.
    FFmpeg counts the picture with its width rounded up to its alignment (96x64 counts as
    128x64), and its `max_pixels` is an int: a larger budget means FFmpeg's own limit."""
    return {"max_pixels": str(min(pixels, 2**31 - 1))}


_REFUSED = re.compile(r"Picture size (\d+)x(\d+) (?:exceeds|is invalid)")


def _refused_size(logs: list) -> tuple[int, int] | None:
    """The picture size FFmpeg's decoder refused while opening (over `max_pixels`, or past its
    own limit), from its log; None when it logged none."""
    for _, _, message in reversed(logs):
        if found := _REFUSED.search(message):
            return int(found[1]), int(found[2])
    return None


def _check_path(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoRejected("file not found; check the path or remove it from the input"
                            ) from None
    except OSError as e:
        raise VideoRejected(f"cannot read the path ({e.strerror}); check it or remove it "
                            "from the input") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoRejected("is a directory, not a video file; list its video files in the "
                            "input instead")
    if not stat.S_ISREG(st.st_mode):
        raise VideoRejected("not a regular file; point the input at video files")
    if st.st_size == 0:
        raise VideoRejected(f"empty file (0 bytes); {FIX}")
    if not os.access(path, os.R_OK):
        raise VideoRejected("permission denied; make the file readable or remove it from "
                            "the input")


def remote_source(path: str, fs: Any) -> Any:
    """An object-store video (`path` a URI, `fs` its filesystem) opened for PyAV, or
    VideoRejected: no such object, a prefix, an empty object, a read the store refused."""
    try:
        return open_source(path, fs)
    except FileNotFoundError:
        raise VideoRejected("no such object; check the path or remove it from the input"
                            ) from None
    except IsADirectoryError:
        raise VideoRejected("is a prefix (a folder), not a video; list its videos in the "
                            "input instead") from None
    except EOFError:
        raise VideoRejected(f"empty object (0 bytes); {FIX}") from None
    except OSError as e:
        raise VideoRejected(f"cannot read it ({storage_reason(e)})") from None


def _head(source: Any) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read(512)
    source.seek(0)
    return source.read(512)


def _open_error(source: Any, error: av.error.FFmpegError, detail: str) -> str:
    """One line for a file FFmpeg cannot open, with a guess at why from its first bytes."""
    head = _head(source)
    if head[4:8] == b"ftyp" and "moov atom not found" in detail:
        return ("truncated mp4: no index (moov atom), the file was cut short or is still "
                f"being written; {FIX}")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # tolerate a character cut at the 512-byte mark
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"not a video: the file is text; {FIX}"
    reason = f"{error.strerror}: {detail}" if detail else str(error.strerror)
    return f"not a readable video (FFmpeg: {reason}); {FIX}"


def _rotation_from_dump(dump: str, index: int) -> int | None:
    """Counter-clockwise degrees from `av_dump_format` text for stream `index`, if any."""
    current = None
    for line in dump.splitlines():
        m = re.search(r"Stream #\d+:(\d+)", line)
        if m:
            current = int(m.group(1))
            continue
        m = re.search(r"rotation of (-?[\d.]+) degrees", line, re.IGNORECASE)
        if m and current == index:
            return int(round(float(m.group(1)) / 90.0)) * 90 % 360
    return None


def _stream_rotation(container: Any, stream: Any, dump: str) -> int:
    rotation = _rotation_from_dump(dump, stream.index)
    if rotation is not None:
        return rotation
    legacy = stream.metadata.get("rotate")  # clockwise degrees
    try:
        return int(round(-float(legacy) / 90.0)) * 90 % 360 if legacy else 0
    except ValueError:
        return 0


def video_stream(container: Any) -> Any:
    """The first video stream that is a video (not a cover picture), or VideoRejected."""
    streams = [s for s in container.streams.video
               if not s.disposition & av.stream.Disposition.attached_pic]
    if streams:
        return streams[0]
    kinds = sorted({s.type for s in container.streams})
    found = ("only a cover picture" if container.streams.video
             else f"only {', '.join(kinds)}" if kinds else "no streams")
    raise VideoRejected(f"not a video: no video stream ({found}); {FIX}")


def sample_aspect(stream: Any) -> float:
    """Width of one stored pixel on screen relative to its height (the header's SAR; 1.0 when
    unset or unusable). Anamorphic video (DV, some broadcast and phone footage) stores, e.g.,
    720x480 for a 4:3 or 16:9 picture: buckets and resizing go by the shown size."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    value = float(sar) if sar else 1.0
    return value if math.isfinite(value) and 0.1 <= value <= 10.0 else 1.0


def probe_video(path: str, max_pixels: int = 8192 * 8192, max_side: int = 16384,
                seconds: float = 30.0, max_frames: int = 0, fs: Any = None) -> dict[str, Any]:
    """Header facts of one video (OUTPUT_TYPES' columns), or VideoRejected with the reason.
    seconds: how long FFmpeg may wait for data while opening (0 = no limit); max_frames: the
    most frames a file's header may claim (0 = no limit), checked before any decoding.
    fs: the filesystem of an object-store `path` (a URI), read through a buffered file."""
    if fs is not None and is_uri(path):
        source = remote_source(path, fs)
        try:
            return _probe(source, max_pixels, max_side, seconds, max_frames)
        finally:
            source.close()
    _check_path(path)
    return _probe(path, max_pixels, max_side, seconds, max_frames)


def _probe(path: Any, max_pixels: int, max_side: int, seconds: float,
           max_frames: int) -> dict[str, Any]:
    with _ffmpeg_log() as logs:
        try:
            # max_pixels also reaches the decoder FFmpeg runs while opening (to learn the
            # pixel format): a bitstream whose parameter set claims a huge picture is not
            # allocated there (an H.264 SPS claiming 12000x8000 cost 250 MB without it)
            container = av.open(path, metadata_errors="ignore", timeout=seconds or None,
                                options=pixel_limit(max_pixels))
        except av.error.ExitError:  # FFmpeg's interrupt callback: the time budget ran out
            raise VideoRejected(f"reading the headers took over {seconds:g} s "
                                f"(probe_seconds); {FIX}") from None
        except av.error.FFmpegError as e:
            detail = next((m.strip() for lvl, _, m in reversed(logs)
                           if lvl <= av.logging.ERROR), "")
            raise VideoRejected(_open_error(path, e, detail)) from None
        try:
            dump = container.dumps_format()
        except Exception:  # the dump only adds rotation; never fail a probe over it
            dump = ""
    with container:
        stream = video_stream(container)
        coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
        if coded_w <= 0 or coded_h <= 0:  # FFmpeg drops a size it refused to allocate
            coded_w, coded_h = _refused_size(logs) or (coded_w, coded_h)
        if coded_w <= 0 or coded_h <= 0:
            raise VideoRejected(
                f"no usable picture size in the header ({coded_w}x{coded_h}; FFmpeg drops "
                f"sizes it cannot allocate); {FIX}")
        if max(coded_w, coded_h) > max_side or coded_w * coded_h > max_pixels:
            raise VideoRejected(
                f"picture too large: the header claims {coded_w}x{coded_h} (limits: side "
                f"{max_side}, {max_pixels} pixels), refused before decoding; {FIX}")
        rotation = _stream_rotation(container, stream, dump)
        shown_w = max(1, round(coded_w * sample_aspect(stream)))  # non-square pixels
        width, height = (coded_h, shown_w) if rotation % 180 else (shown_w, coded_h)

        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not math.isfinite(fps) or fps <= 0:
            raise VideoRejected(f"unknown frame rate (none in the header); {FIX}")

        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if duration <= 0 and container.duration:
            duration = container.duration / av.time_base
        if duration <= 0 and stream.frames:
            duration = stream.frames / fps
        if not math.isfinite(duration) or duration <= 0:
            raise VideoRejected(f"unknown duration (none in the header, no frame count); {FIX}")
        num_frames = stream.frames if stream.frames > 0 else max(1, round(duration * fps))
        if max_frames and max(num_frames, duration * fps) > max_frames:
            raise VideoRejected(
                f"too many frames: the header claims {max(num_frames, round(duration * fps))} "
                f"(max_frames {max_frames}), refused before decoding; {FIX}")
        codec = stream.codec_context.name
    return {"width": width, "height": height, "fps": fps, "duration": duration,
            "rotation": rotation, "codec": codec, "num_frames": num_frames}


class ProbeStage:
    """`path` -> header facts of each video; unusable inputs become error rows ("probe").

    Resources: the `probe` entry of the job config (a CPU share), little memory; it reads
    headers only (a few KB to a few MB per
    file, the whole index of an mp4), so it is I/O bound and cheap next to decoding.
    """

    READS = ("path",)  # every other input column (caption, ...) passes through
    WRITES = tuple(OUTPUT_TYPES)

    @classmethod
    def spec(cls, cfg: Any, errors_dir: Any, fs: Any = None) -> StageSpec:
        """From a clip config (pipeline/streams.py `ClipConfig`): its header limits and its
        `probe` pool; `fs`: the filesystem of object-store inputs."""
        return StageSpec("probe", cls, dict(
            errors_dir=errors_dir, max_pixels=cfg.max_pixels, max_side=cfg.max_side,
            seconds=cfg.probe_seconds, max_frames=cfg.max_frames, fs=fs), cfg.probe)

    def __init__(self, errors_dir: Any = None, max_pixels: int = 8192 * 8192,
                 max_side: int = 16384, seconds: float = 30.0, max_frames: int = 0,
                 fs: Any = None):
        self.fs = fs
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.seconds = seconds
        self.max_frames = max_frames
        self.errors = ErrorSink(errors_dir, "probe")

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "probe")
        keep: list[bool] = []
        facts: list[dict[str, Any]] = []
        for path in batch.column("path").to_pylist():
            try:
                facts.append(probe_video(str(path), self.max_pixels, self.max_side,
                                         self.seconds, self.max_frames, self.fs))
                keep.append(True)
            except VideoRejected as e:
                self.errors.add(str(path), str(e))
                keep.append(False)
            except Exception as e:  # never fail the job over one input
                self.errors.add(str(path), f"probe failed ({type(e).__name__}: {e}); {FIX}"
                                .splitlines()[0])
                keep.append(False)
        out = batch.filter(pa.array(keep, pa.bool_()))
        columns = {name: pa.array([f[name] for f in facts], type)
                   for name, type in OUTPUT_TYPES.items()}
        self.errors.flush()
        return with_columns(out, columns)
