"""VAE encode stage: decoded clips in, latents (the on-disk contract) out.

Reads `id`, `path`, `bucket`, `frames` (+ `frames_shape`, uint8 (T, H, W, 3)); writes `latent` (flat
list of float16/float32) and `latent_shape` ((C, T', H', W')), `encode_seconds`, and drops the
frames. Rows are grouped by bucket and each group is cut into the bucket's batch size, so
every VAE forward gets one shape. Resources: one GPU when the config gives the stage one,
otherwise a CPU share (torch threads follow the share, at least 1).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.buckets import BucketConfig, BucketTable, shape_chunks
from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.tensors import unpack
from actors.common.vae import VAEStageConfig, load_stage_vae
from actors.common.video import frames_to_video
from models.device import pick_device, torch_dtype


class VAEEncodeStage:
    READS = ("id", "path", "bucket", "frames", "frames_shape")
    WRITES = ("latent", "latent_shape", "encode_seconds")

    @classmethod
    def spec(cls, cfg: Any, errors_dir: str | None) -> StageSpec:
        """From a preprocess config (pipeline/streams.py `PreprocessConfig`): its VAE, buckets,
        latent dtype and `encode` pool (whose CPU share is also torch's thread count)."""
        return StageSpec("encode", cls, dict(
            vae=cfg.vae, buckets=cfg.buckets, errors_dir=errors_dir,
            latent_dtype=cfg.latent_dtype, num_cpus=cfg.encode.num_cpus), cfg.encode)

    def __init__(self, vae: VAEStageConfig, buckets: BucketConfig,
                 errors_dir: str | None = None, latent_dtype: str = "float16",
                 num_cpus: float = 1.0):
        self.device = pick_device(vae.device, num_cpus)
        self.dtype = torch_dtype(vae.dtype)
        self.model = load_stage_vae(vae, self.device)
        self.tile_px = vae.tile_px
        self.batch_sizes = {b.name: b.batch_size for b in BucketTable(buckets).buckets.values()}
        self.latent_dtype = np.dtype(latent_dtype)
        self.errors = ErrorSink(errors_dir, "encode")

    @torch.inference_mode()
    def encode(self, frames: list[np.ndarray]) -> np.ndarray:
        x = frames_to_video(frames).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            if self.tile_px:
                z = self.model.encode_tiled(x, tile_px=self.tile_px, overlap_px=self.tile_px // 4)
            else:
                z = self.model.encode(x)  # (B, C, T', H', W')
        return z.float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "VAE encode")
        frames = unpack(batch, "frames", np.uint8)
        ids = batch.column("id").to_pylist()
        latents: list[np.ndarray | None] = [None] * len(frames)
        seconds = [0.0] * len(frames)
        buckets = batch.column("bucket").to_pylist()
        for chunk in shape_chunks(frames, buckets, self.batch_sizes):
            start = time.perf_counter()
            try:
                z = self.encode([frames[i] for i in chunk])
            except Exception as e:  # noqa: BLE001 - one bad clip must not end the job
                for i in chunk:
                    self.errors.add(batch.column("path")[i].as_py(),
                                    f"VAE encode failed for clip {ids[i]}: {e}")
                continue
            took = (time.perf_counter() - start) / len(chunk)
            for j, i in enumerate(chunk):
                latents[i], seconds[i] = z[j], took
        self.errors.flush()
        keep = [i for i, z in enumerate(latents) if z is not None]
        out = batch.drop_columns(["frames", "frames_shape"]).take(pa.array(keep, pa.int64()))
        flat = np.concatenate([latents[i].astype(self.latent_dtype).ravel() for i in keep]) \
            if keep else np.zeros(0, self.latent_dtype)
        offsets = np.concatenate([[0], np.cumsum([latents[i].size for i in keep])]).astype(np.int32)
        latent = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        shapes = pa.array([list(latents[i].shape) for i in keep], type=pa.list_(pa.int32()))
        return (out.append_column("latent", latent).append_column("latent_shape", shapes)
                .append_column("encode_seconds", pa.array([seconds[i] for i in keep],
                                                          pa.float64())))
