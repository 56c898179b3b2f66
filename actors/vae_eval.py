"""VAE eval stage: decoded clips in, reconstruction quality per clip out (PSNR, SSIM).

Both sides are compared as uint8 RGB: the reconstruction is clamped to [-1, 1] and rounded to
uint8, as it would be before writing an mp4; `models/metrics.py` defines PSNR and SSIM of a
clip. Per video and overall the job averages these (pipeline/eval_vae.py).

`VAEEvalStage` reads `id`, `path`, `bucket`, `start`, `fps`, `frames` (+ `frames_shape`),
writes the metric columns and drops the frames (only small rows go back to the driver);
optionally it writes each reconstruction as an h264 mp4. Resources: like the VAE encode
stage (a GPU when given one, else a CPU share; torch threads follow the share).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.buckets import BucketConfig, BucketTable, shape_chunks
from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import as_store
from actors.common.tensors import unpack
from actors.common.vae import load_checkpoint_vae
from actors.common.video import frames_to_video, to_uint8, write_mp4
from models.device import pick_device
from models.metrics import clip_metrics


class VAEEvalStage:
    READS = ("id", "path", "bucket", "start", "fps", "frames", "frames_shape")
    WRITES = ("num_frames", "height", "width", "mse", "psnr", "ssim", "eval_seconds", "video")

    @classmethod
    def spec(cls, cfg: Any, checkpoint: str, errors_dir: Any, videos_dir: Any = ""
             ) -> StageSpec:
        """From an eval-vae config (pipeline/eval_vae.py `EvalVAEConfig`): its buckets, its
        `eval:` section's settings and pool; reconstructions into `videos_dir` ("" = none)."""
        e = cfg.eval
        return StageSpec("eval", cls, dict(
            checkpoint=checkpoint, buckets=cfg.preprocess.buckets, errors_dir=errors_dir,
            device=e.device, tile_px=e.tile_px, videos_dir=videos_dir, crf=e.crf,
            num_cpus=e.stage.num_cpus), e.stage)

    def __init__(self, checkpoint: str, buckets: BucketConfig, errors_dir: Any = None,
                 device: str = "auto", tile_px: int = 0, videos_dir: Any = "", crf: int = 18,
                 num_cpus: float = 1.0):
        self.device = pick_device(device, num_cpus)
        self.model = load_checkpoint_vae(checkpoint, self.device)
        self.tile_px, self.crf = tile_px, crf
        self.videos_dir = as_store(videos_dir) if videos_dir else None
        self.batch_sizes = {b.name: b.batch_size for b in BucketTable(buckets).buckets.values()}
        self.errors = ErrorSink(errors_dir, "eval")

    @torch.inference_mode()
    def reconstruct(self, frames: list[np.ndarray]) -> torch.Tensor:
        """uint8 clips of one shape -> uint8 reconstructions (B, T, H, W, 3) on the CPU."""
        x = frames_to_video(frames).to(self.device)  # (B, 3, T, H, W)
        if self.tile_px:
            z = self.model.encode_tiled(x, tile_px=self.tile_px, overlap_px=self.tile_px // 4)
            y = self.model.decode_tiled(z, tile_px=self.tile_px, overlap_px=self.tile_px // 4)
        else:
            y = self.model.decode(self.model.encode(x))
        return to_uint8(y).cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "VAE eval")
        frames = unpack(batch, "frames", np.uint8)
        rows = batch.select(["id", "path", "bucket", "start", "fps"]).to_pylist()
        out: list[dict] = []
        buckets = [r["bucket"] for r in rows]
        for chunk in shape_chunks(frames, buckets, self.batch_sizes):  # one shape per forward
            start = time.perf_counter()
            try:
                recon = self.reconstruct([frames[i] for i in chunk])
            except Exception as e:  # noqa: BLE001 - one bad clip must not end the job
                for i in chunk:
                    self.errors.add(rows[i]["path"], f"VAE reconstruction failed for clip "
                                    f"{rows[i]['id']}: {e}".splitlines()[0])
                continue
            took = (time.perf_counter() - start) / len(chunk)
            for j, i in enumerate(chunk):
                out.append(self.measure(rows[i], frames[i], recon[j], took))
        self.errors.flush()
        return pa.Table.from_pylist(out, schema=EVAL_SCHEMA)

    def measure(self, row: dict, original: np.ndarray, recon: torch.Tensor, took: float) -> dict:
        T, H, W, _ = original.shape
        metrics = clip_metrics(torch.from_numpy(np.array(original)), recon)  # own copy: writable
        video = ""
        if self.videos_dir is not None:
            name = f"{Path(row['path']).stem}-{row['start']:.2f}s-{row['id'][:8]}.mp4"
            target = self.videos_dir.child(name)
            with target.staged() as path:
                write_mp4(path, recon.numpy(), row["fps"], crf=self.crf)
            video = str(target)
        return {**row, "num_frames": T, "height": H, "width": W, **metrics,
                "eval_seconds": took, "video": video}


EVAL_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("bucket", pa.string()),
    ("start", pa.float64()), ("fps", pa.float64()), ("num_frames", pa.int32()),
    ("height", pa.int32()), ("width", pa.int32()), ("mse", pa.float64()),
    ("psnr", pa.float64()), ("ssim", pa.float64()), ("eval_seconds", pa.float64()),
    ("video", pa.string()),
])
