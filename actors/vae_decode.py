"""Stage: latents -> uint8 frames, by the VAE decoder (its own actor pool, apart from the
DiT sampler, so neither model's memory limits the other).

Reads `latent` (+ `latent_shape`, float32 (C, T', H', W') in the VAE's normalised space);
writes `video` (uint8 (T, H, W, 3)), `decode_seconds` and `latents` (with `output`, the
`latents/<name>.npy` it saved the latent to, for re-decoding or comparing runs; else ""), and
drops the latent. Memory is bounded whatever the frame count: decoding always runs in causal
time chunks of `chunk_frames` (exact: each causal conv carries its past frames across chunks),
and in overlapping spatial tiles when the VAE config's `tile_px` > 0. One video per forward (rows of
a generation batch may differ in shape).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.storage import as_store
from actors.common.tensors import pack, unpack, with_columns
from actors.common.vae import VAEStageConfig, load_stage_vae
from actors.common.video import to_uint8
from models.device import pick_device, torch_dtype


class VAEDecodeStage:
    READS = ("id", "latent", "latent_shape")
    WRITES = ("video", "video_shape", "latents", "decode_seconds")
    DROPS = ("latent", "latent_shape")

    @classmethod
    def spec(cls, cfg: Any, output: Any = "", source: Any = None, export: str = ""
             ) -> StageSpec:
        """From a generate config: its `vae:` section, `chunk_frames` and `decode` pool (whose
        CPU share is also torch's thread count); `output`: save each row's latents there;
        `source` / `export`: an object-store model and its local copy (a pipeline folder's
        VAE lives in it: a node without the copy makes it)."""
        return StageSpec("decode", cls, dict(vae=cfg.vae, num_cpus=cfg.decode.num_cpus,
                                             chunk_frames=cfg.chunk_frames, output=output,
                                             source=source, export=export), cfg.decode)

    def __init__(self, vae: VAEStageConfig, num_cpus: float = 1.0, chunk_frames: int = 16,
                 output: Any = "", source: Any = None, export: str = ""):
        from actors.common.storage import ensure_local

        ensure_local(export, source)
        self.out = as_store(output) if output else None  # save the latents under out/latents/
        self.device = pick_device(vae.device, num_cpus)
        self.dtype = torch_dtype(vae.dtype)
        self.model = load_stage_vae(vae, self.device)
        self.tile_px, self.chunk_frames = vae.tile_px, chunk_frames

    @torch.inference_mode()
    def decode(self, z: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(np.array(z))[None].to(self.device)  # (1, C, T', H', W')
        s = self.model.spatial_factor
        tile = self.tile_px or s * max(z.shape[-2:])  # 0: one tile, the whole frame
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            x = self.model.decode_tiled(z.to(torch.float32), tile_px=tile,
                                        overlap_px=self.tile_px // 4 // s * s,
                                        chunk_frames=self.chunk_frames)
        return to_uint8(x.float())[0].cpu().numpy()  # (T, H, W, 3)

    def save(self, name: str, z: np.ndarray) -> str:
        """`latents/<name>.npy` (float32 (C, T', H', W')), written whole (a folder: renamed
        into place; an object store: one PUT)."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(z, np.float32))
        self.out.child("latents", f"{name}.npy").write_bytes(buf.getvalue())
        return f"latents/{name}.npy"

    def __call__(self, batch: pa.Table) -> pa.Table:
        reads = self.READS + (("name",) if self.out else ())
        require_columns(batch, reads, "VAE decode")
        frames, seconds, saved = [], [], []
        names = batch.column("name").to_pylist() if self.out else [None] * batch.num_rows
        for name, z in zip(names, unpack(batch, "latent", np.float32), strict=True):
            t0 = time.perf_counter()
            frames.append(self.decode(z))
            seconds.append(time.perf_counter() - t0)
            saved.append(self.save(name, z) if self.out else "")
        batch = batch.drop_columns(list(self.DROPS))
        return with_columns(batch, {**pack("video", frames), "latents": pa.array(saved),
                                    "decode_seconds": pa.array(seconds, pa.float64())})
