"""VAE encode stage: decoded clips in, latents (the on-disk contract) out.

Reads `id`, `bucket`, `frames` (+ `frames_shape`, uint8 (T, H, W, 3)); writes `latent` (flat
list of float16/float32) and `latent_shape` ((C, T', H', W')), `encode_seconds`, and drops the
frames. Rows are grouped by bucket and each group is cut into the bucket's batch size, so
every VAE forward gets one shape. Resources: one GPU when the config gives the stage one,
otherwise a CPU share (torch threads follow the share, at least 1).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from actors.common.buckets import BucketConfig, BucketTable
from actors.common.errors import ErrorSink
from actors.common.tensors import unpack
from models.vae import build_vae, load_vae


@dataclass
class VAEStageConfig:
    checkpoint: str = ""  # a save_vae() safetensors file; "" = seeded random init (plumbing)
    preset: str = "debug"  # used only without a checkpoint
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tile_px: int = 0  # > 0: tiled encode (bounded memory for large frames)

    def validate(self) -> None:
        if self.tile_px < 0:
            raise ValueError(f"tile_px: must be >= 0 (0 = untiled), got {self.tile_px}")


ROOT = Path(__file__).resolve().parents[1]


def resolve_checkpoint(path: str) -> str:
    """A relative checkpoint path is looked up in the working directory, then in the project
    (so `weights/vae-default.safetensors` works from anywhere). Raises naming the path."""
    if not path:
        return ""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(f"VAE checkpoint {path} not found (looked in the working directory "
                            f"and in {ROOT}); train one with `tubelet train-vae` or set "
                            "vae.checkpoint: '' for a random init")


def load_stage_vae(cfg: VAEStageConfig, device: str) -> torch.nn.Module:
    if cfg.checkpoint:
        return load_vae(resolve_checkpoint(cfg.checkpoint), device=device)
    torch.manual_seed(cfg.seed)
    return build_vae(cfg.preset).to(device).eval()


def frames_to_video(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips (T, H, W, 3), one shape -> float video (B, 3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(frames))  # (B, T, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (B, 3, T, H, W)


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


class VAEEncodeStage:
    READS = ("id", "bucket", "frames", "frames_shape")
    WRITES = ("latent", "latent_shape", "encode_seconds")

    def __init__(self, vae: VAEStageConfig, buckets: BucketConfig,
                 errors_dir: str | None = None, latent_dtype: str = "float16",
                 num_cpus: float = 1.0):
        device = vae.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(num_cpus)))
        self.device = torch.device(device)
        self.dtype = getattr(torch, vae.dtype)
        self.model = load_stage_vae(vae, device)
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
        out = batch.drop_columns(["frames", "frames_shape"]).take(keep)
        flat = np.concatenate([latents[i].astype(self.latent_dtype).ravel() for i in keep]) \
            if keep else np.zeros(0, self.latent_dtype)
        offsets = np.concatenate([[0], np.cumsum([latents[i].size for i in keep])]).astype(np.int32)
        latent = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        shapes = pa.array([list(latents[i].shape) for i in keep], type=pa.list_(pa.int32()))
        return (out.append_column("latent", latent).append_column("latent_shape", shapes)
                .append_column("encode_seconds", pa.array([seconds[i] for i in keep],
                                                          pa.float64())))
