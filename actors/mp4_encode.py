"""Stage: uint8 frames -> `DIR/videos/<name>.mp4` (PyAV, CPU) and `DIR/sheets/<name>.png` (a
contact sheet), generation's last stage.

Reads `name` (the id made safe by pipeline/prompts.py:safe_name), `fps`, `video`; writes
`file`, `sheet` (paths relative to DIR) and `encode_seconds`, and drops the frames, so what
comes back to the driver is one small manifest row per video. Files are written whole (temp
name, then rename): a killed job leaves no half file under a final name.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import Store, as_store
from actors.common.tensors import unpack, with_columns
from actors.common.video import contact_sheet, write_mp4


class Mp4EncodeStage:
    READS = ("id", "name", "fps", "video", "video_shape")
    WRITES = ("file", "sheet", "encode_seconds")
    DROPS = ("video", "video_shape")

    @classmethod
    def spec(cls, cfg: Any, output: str | Store) -> StageSpec:
        """From a generate config: its mp4 settings and `encode` pool, writing under
        `output`."""
        return StageSpec("encode", cls, dict(output=output, codec=cfg.codec, crf=cfg.crf,
                                             preset=cfg.preset, pix_fmt=cfg.pix_fmt), cfg.encode)

    def __init__(self, output: str | Store, codec: str = "libx264", crf: int = 18,
                 preset: str = "veryfast", threads: int = 1, pix_fmt: str = "yuv420p"):
        self.store = as_store(output)  # an object store's files: made here, one PUT each
        self.codec, self.crf, self.preset, self.threads = codec, crf, preset, threads
        self.pix_fmt = pix_fmt

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "mp4 encode")
        files, sheets, seconds = [], [], []
        for name, fps, frames in zip(batch.column("name").to_pylist(),
                                     batch.column("fps").to_pylist(),
                                     unpack(batch, "video", np.uint8), strict=True):
            t0 = time.perf_counter()
            file, sheet = f"videos/{name}.mp4", f"sheets/{name}.png"
            with self.store.child("sheets", f"{name}.png").staged() as path:
                contact_sheet(frames, path)
            # last: the video's presence marks the row done on resume
            with self.store.child("videos", f"{name}.mp4").staged() as path:
                write_mp4(path, iter(frames), fps, self.codec, self.crf, self.preset,
                          self.threads, self.pix_fmt)
            files.append(file)
            sheets.append(sheet)
            seconds.append(time.perf_counter() - t0)
        batch = batch.drop_columns(list(self.DROPS))
        return with_columns(batch, {"file": pa.array(files), "sheet": pa.array(sheets),
                                    "encode_seconds": pa.array(seconds, pa.float64())})
