"""VAE eval stage: decoded clips in, reconstruction quality per clip out (PSNR, SSIM).

Metrics (the definitions `tubelet eval-vae` reports):
- both sides are uint8 RGB: the reconstruction is clamped to [-1, 1] and rounded to uint8, as
  it would be before writing an mp4, then both are scaled to [0, 1];
- PSNR of a clip: 10 log10(1 / MSE), the MSE over all its frames, pixels and RGB channels;
- SSIM of a clip: the mean over its frames of per-frame SSIM (Wang et al. 2004): an 11-tap
  gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, computed on each RGB
  channel over the 'valid' window positions (no padding, as scikit-image does with
  gaussian_weights=True) and averaged over channels and positions.
Per video and overall the job averages these (pipeline/eval_vae.py).

`VAEEvalStage` reads `id`, `path`, `bucket`, `start`, `fps`, `frames` (+ `frames_shape`),
writes the metric columns and drops the frames (only small rows go back to the driver);
optionally it writes each reconstruction as an h264 mp4. Resources: like the VAE encode
stage (a GPU when given one, else a CPU share; torch threads follow the share).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from actors.common.buckets import BucketConfig, BucketTable
from actors.common.errors import ErrorSink
from actors.common.tensors import unpack
from actors.vae_encode import frames_to_video, shape_chunks

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) images in [0, data_range] -> (N,), mean over C and the
    valid window positions. H and W must be >= 11."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = gaussian_window().to(x.device)
    gx = g.view(1, 1, 1, -1).expand(C, 1, 1, -1)  # (C, 1, 1, 11): separable, per channel
    gy = g.view(1, 1, -1, 1).expand(C, 1, -1, 1)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(v, gx, groups=C), gy, groups=C)  # (N, C, H-10, W-10)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
         / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))  # (N, C, H-10, W-10)
    return s.mean(dim=(1, 2, 3))  # (N,)


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    return 10 * math.log10(peak**2 / max(mse, 1e-12))


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), clamped and rounded."""
    x = (video.clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)


def clip_metrics(original: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """uint8 (T, H, W, 3) clips -> {"mse", "psnr", "ssim"} on [0, 1] (module docstring)."""
    a = original.permute(0, 3, 1, 2).double() / 255  # (T, 3, H, W)
    b = recon.permute(0, 3, 1, 2).double() / 255
    mse = float((a - b).square().mean())
    return {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": float(ssim(a, b).mean())}


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 (T, H, W, 3) -> h264 mp4 (yuv420p; H and W must be even), written whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    from fractions import Fraction

    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


def load_eval_vae(checkpoint: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A `save_vae` file, or a one-line ValueError naming it and what to pass instead."""
    from models.vae import load_vae

    try:
        return load_vae(checkpoint, device=device)
    except FileNotFoundError:
        raise ValueError(f"VAE checkpoint {checkpoint} does not exist; pass a .safetensors "
                         "file written by `tubelet train-vae` (RUN/export/vae.safetensors)"
                         ) from None
    except Exception as e:  # a text file, a truncated file, a DiT export, ...
        raise ValueError(f"{checkpoint} is not a tubelet VAE checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}); pass a "
                         ".safetensors file written by `tubelet train-vae`") from None


class VAEEvalStage:
    READS = ("id", "path", "bucket", "start", "fps", "frames", "frames_shape")
    WRITES = ("num_frames", "height", "width", "mse", "psnr", "ssim", "eval_seconds", "video")
    RESOURCES = {"num_cpus": 1}

    def __init__(self, checkpoint: str, buckets: BucketConfig, errors_dir: str | None = None,
                 device: str = "auto", tile_px: int = 0, videos_dir: str = "", crf: int = 18,
                 num_cpus: float = 1.0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(num_cpus)))
        self.device = torch.device(device)
        self.model = load_eval_vae(checkpoint, self.device)
        self.tile_px, self.crf = tile_px, crf
        self.videos_dir = Path(videos_dir) if videos_dir else None
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
        metrics = clip_metrics(torch.from_numpy(np.ascontiguousarray(original)), recon)
        video = ""
        if self.videos_dir is not None:
            name = f"{Path(row['path']).stem}-{row['start']:.2f}s-{row['id'][:8]}.mp4"
            write_mp4(self.videos_dir / name, recon.numpy(), row["fps"], self.crf)
            video = str(self.videos_dir / name)
        return {**row, "num_frames": T, "height": H, "width": W, **metrics,
                "eval_seconds": took, "video": video}


EVAL_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("bucket", pa.string()),
    ("start", pa.float64()), ("fps", pa.float64()), ("num_frames", pa.int32()),
    ("height", pa.int32()), ("width", pa.int32()), ("mse", pa.float64()),
    ("psnr", pa.float64()), ("ssim", pa.float64()), ("eval_seconds", pa.float64()),
    ("video", pa.string()),
])
