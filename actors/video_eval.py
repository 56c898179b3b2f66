"""Video eval: decode each video and measure its main object's temporal consistency and what
it is (models/video_metrics.py has the definitions).

Input rows: `path`, `set` (generated / reference) and, from the prompt, the expected `color`,
`shape`, `direction` (null where the prompt does not say). Output rows: those, plus the
detected colour / shape / direction, whether each matches, and the consistency numbers
(vanish, color_flicker, hist_flicker, vbench_flicker, area_cv, extent_std, solidity_std,
morph, jerk). A file that cannot be decoded is an error row, and the rest go on.
"""

from __future__ import annotations

import math
from typing import Any

import av
import numpy as np
import pyarrow as pa

from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import open_source
from models.video_metrics import Palette, consistency, direction_of, shape_of, track_object

METRICS = ("vanish", "color_flicker", "hist_flicker", "vbench_flicker", "area_cv",
           "extent_std", "solidity_std", "morph", "jerk")
CHECKS = ("color", "shape", "direction")


def read_frames(path: str, max_frames: int = 0, fps: float = 0.0, fs: Any = None
                ) -> np.ndarray:
    """The frames (or the first `max_frames`) as uint8 (T, H, W, 3); with `fps` > 0, the
    first frame at or after each time k / fps (so videos at any rate compare per step).
    `fs`: the filesystem of an object-store `path` (a URI)."""
    source = open_source(path, fs)
    try:
        return _read_frames(source, max_frames, fps)
    finally:
        if source is not path:
            source.close()


def _read_frames(path: Any, max_frames: int, fps: float) -> np.ndarray:
    frames = []
    with av.open(path) as container:
        for frame in container.decode(video=0):
            t = frame.time if frame.time is not None else 0.0
            if fps and t < len(frames) / fps - 1e-3:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError("has no decodable video frame")
    return np.stack(frames)


def evaluate(frames: np.ndarray, palette: Palette, shapes: dict[str, tuple[float, float, float]],
             directions: dict[str, tuple[float, float]], tol: float = 80.0,
             direction_frames: int = 4) -> dict[str, Any]:
    """What one video shows: detected colour / shape / direction and the consistency numbers."""
    track = track_object(frames, palette, tol=tol)
    return {"detected_color": track.color, "detected_shape": shape_of(track, shapes),
            "detected_direction": direction_of(track, directions, direction_frames),
            "frames": int(len(frames)), **consistency(frames, track)}


class VideoEvalStage:
    READS = ("path", "set", *CHECKS)  # + the prompt's other columns, passed through
    WRITES = (*(f"detected_{k}" for k in CHECKS), "frames", *METRICS,
              *(f"{k}_ok" for k in CHECKS))

    @classmethod
    def spec(cls, cfg: Any, errors_dir: Any, palette: Palette,
             shapes: dict[str, tuple[float, float, float]],
             directions: dict[str, tuple[float, float]], fs: Any = None) -> StageSpec:
        """From an eval config (pipeline/eval.py `EvalConfig`): its measuring settings and
        `stage` pool; what the videos are measured against (the synth palette, shapes and
        directions) comes from the command."""
        return StageSpec("eval", cls, dict(
            palette=palette, shapes=shapes, directions=directions, errors_dir=errors_dir,
            tol=cfg.tol, direction_frames=cfg.direction_frames, max_frames=cfg.max_frames,
            fps=cfg.fps, fs=fs), cfg.stage)

    def __init__(self, palette: Palette, shapes: dict[str, tuple[float, float, float]],
                 directions: dict[str, tuple[float, float]], errors_dir: Any = None,
                 tol: float = 80.0, direction_frames: int = 4, max_frames: int = 0,
                 fps: float = 0.0, fs: Any = None):
        self.fs = fs  # object-store videos (URIs) are read through it
        self.palette, self.shapes, self.directions = palette, shapes, directions
        self.tol, self.direction_frames, self.max_frames = tol, direction_frames, max_frames
        self.fps = fps
        self.errors = ErrorSink(errors_dir, "eval")

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "eval")
        out = []
        for row in batch.to_pylist():
            try:
                frames = read_frames(row["path"], self.max_frames, self.fps, self.fs)
            except (av.FFmpegError, ValueError, OSError, EOFError) as e:
                self.errors.add(row["path"], f"{e}; re-encode or remove the file")
                continue
            found = evaluate(frames, self.palette, self.shapes, self.directions, self.tol,
                             self.direction_frames)
            for key in CHECKS:  # null: the prompt does not say
                want = row[key]
                found[f"{key}_ok"] = None if want is None else found[f"detected_{key}"] == want
            out.append({**row, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                  for k, v in found.items()}})
        self.errors.flush()
        return pa.Table.from_pylist(out, schema=schema(batch.schema))


def schema(inputs: pa.Schema) -> pa.Schema:
    fields = [*inputs, *(pa.field(f"detected_{k}", pa.string()) for k in CHECKS),
              pa.field("frames", pa.int64()), *(pa.field(m, pa.float64()) for m in METRICS),
              *(pa.field(f"{k}_ok", pa.bool_()) for k in CHECKS)]
    return pa.schema(fields)
