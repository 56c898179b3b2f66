"""Video I/O shared by the stages: uint8 frames <-> model tensors, and the one mp4 writer.

Layouts: frames on disk and in Arrow are uint8 (T, H, W, 3) RGB; models take float
(B, 3, T, H, W) in [-1, 1]. `to_video` / `frames_to_video` go one way, `to_uint8` the other
(clamped and rounded, as a frame is before it is encoded).
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


def to_video(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> float video (B, 3, T, H, W) in [-1, 1]."""
    return clips.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (B, 3, T, H, W)


def frames_to_video(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips (T, H, W, 3) of one shape -> float video (B, 3, T, H, W) in [-1, 1]."""
    return to_video(torch.from_numpy(np.stack(frames)))  # stack: (B, T, H, W, 3)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), clamped and rounded."""
    x = (video.clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float,
              codec: str = "libx264", crf: int = 18, preset: str = "veryfast",
              threads: int = 0, pix_fmt: str = "yuv420p") -> Path:
    """uint8 RGB frames (H, W, 3) -> an mp4 (in `pix_fmt`: yuv420p, the default, needs even H
    and W; yuv444p keeps full colour resolution), written whole:
    under a temporary name, renamed at the end, so a crash never leaves a half file at `path`.
    `frames` may be a generator (frames are encoded as they come); `threads` = 0 lets the
    codec choose."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        with av.open(str(tmp), "w") as container:
            stream = None
            for frame in frames:
                if stream is None:
                    stream = container.add_stream(codec,
                                                  rate=Fraction(fps).limit_denominator(1001))
                    stream.width, stream.height = frame.shape[1], frame.shape[0]
                    stream.pix_fmt = pix_fmt
                    stream.options = {"crf": str(crf), "preset": preset}
                    if threads:
                        stream.codec_context.thread_count = threads
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            container.mux(stream.encode())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def contact_sheet(frames: np.ndarray, path: str | Path, columns: int = 8) -> Path:
    """A PNG of up to `columns` frames of a (T, H, W, 3) uint8 video, evenly spaced in time,
    side by side (written whole: temp name, then rename)."""
    from PIL import Image

    T = frames.shape[0]
    picks = sorted({round(i * (T - 1) / max(1, columns - 1)) for i in range(min(columns, T))})
    sheet = np.concatenate([frames[i] for i in picks], axis=1)  # (H, n * W, 3)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        Image.fromarray(sheet).save(tmp, format="PNG")
        tmp.replace(path)
    finally:  # a full disk leaves no half-written temp file behind
        tmp.unlink(missing_ok=True)
    return path
