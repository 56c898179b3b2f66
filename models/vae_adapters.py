"""diffusers video autoencoders behind tubelet's `VideoAutoencoder` interface.

Supported: `AutoencoderKLWan` (Wan 2.1/2.2), `AutoencoderKLCogVideoX`,
`AutoencoderKLHunyuanVideo`, loaded from a local directory only (never downloaded). diffusers
is an optional extra (`pip install 'tubelet[bench]'`) and is imported on first use. The stages
load these through `actors/common/vae.py` whenever a VAE checkpoint path is a folder.

The latent contract is ours: pixels in [-1, 1] as (B, 3, T, H, W) with T = 1 + tk, latents
(B, C, T', H', W') normalised the way each model's pipeline does it:
- Wan: per-channel `(z - latents_mean) / latents_std`; scaling_factor = 1 / latents_std and
  shift_factor = latents_mean, both tensors of shape (C,). 4x8x8 (Wan 2.2 5B: 4x16x16, C=48).
- CogVideoX: `z * scaling_factor` (1.15258426 for 2B, 0.7 for 5B); 4x8x8, C=16.
- HunyuanVideo: `z * scaling_factor` (0.476986); 4x8x8, C=16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.safety import require_safetensors
from models.vae import check_latent, check_video, scale_latent, unscale_latent
from models.vae_blocks import check_tiling

SUPPORTED = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo")


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "the diffusers VAE adapters need the optional 'diffusers' package: "
            "pip install 'tubelet[bench]' (or pip install diffusers)"
        ) from e
    return diffusers


def wan_factors(config: Any) -> tuple[int, int]:
    """(temporal, spatial) compression of an AutoencoderKLWan from its config's layers."""
    down = list(config.get("temperal_downsample") or [False, True, True])
    patch = int(config.get("patch_size") or 1)
    return 2 ** sum(bool(d) for d in down), 2 ** len(down) * patch


class DiffusersVideoVAE:
    """A diffusers video VAE with tubelet's encode/decode contract (inference only)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        name = type(vae).__name__
        if name not in SUPPORTED:
            raise ValueError(f"unsupported diffusers VAE {name}; supported: {', '.join(SUPPORTED)}")
        self.vae = vae.eval()
        self.kind = name
        # A diffusers FrozenDict: optional keys differ between diffusers versions.
        hf_config = vae.config
        if name == "AutoencoderKLWan":
            self.latent_channels = int(hf_config.z_dim)
            # From the layers, not scale_factor_*: diffusers fills those keys with Wan 2.1's 4 and
            # 8 where a config lacks them. Each stage halves H and W (and T where
            # temperal_downsample says so); Wan 2.2's VAE first patchifies frames
            # patch_size x patch_size: 16x spatial.
            self.temporal_factor, self.spatial_factor = wan_factors(hf_config)
            std = torch.tensor(hf_config.latents_std, dtype=torch.float32)
            self.scaling_factor: float | Tensor = 1.0 / std
            mean = torch.tensor(hf_config.latents_mean, dtype=torch.float32)
            self.shift_factor: float | Tensor = mean
        elif name == "AutoencoderKLCogVideoX":
            self.latent_channels = int(hf_config.latent_channels)
            self.temporal_factor = int(hf_config.temporal_compression_ratio)
            self.spatial_factor = 2 ** (len(hf_config.block_out_channels) - 1)
            scale = float(hf_config.scaling_factor)
            # CogVideoX 1.5 I2V checkpoints set invert_scale_latents: the pipeline divides.
            self.scaling_factor = 1.0 / scale if hf_config.get("invert_scale_latents") else scale
            self.shift_factor = float(hf_config.get("shift_factor") or 0.0)
        else:
            self.latent_channels = int(hf_config.latent_channels)
            self.temporal_factor = int(hf_config.temporal_compression_ratio)
            self.spatial_factor = int(hf_config.spatial_compression_ratio)
            self.scaling_factor = float(hf_config.scaling_factor)
            self.shift_factor = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def scale_latent(self, z: Tensor) -> Tensor:
        return scale_latent(z, self.scaling_factor, self.shift_factor)

    def unscale_latent(self, z: Tensor) -> Tensor:
        return unscale_latent(z, self.scaling_factor, self.shift_factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        t, s = self.temporal_factor, self.spatial_factor
        return (self.latent_channels, 1 + (frames - 1) // t, height // s, width // s)

    @torch.no_grad()
    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        check_video(x, self.temporal_factor, self.spatial_factor)
        posterior = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_latent(z.float())

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        check_latent(z, self.latent_channels)
        frames = 1 + (z.shape[2] - 1) * self.temporal_factor
        z = self.unscale_latent(z.float()).to(self.device, self.dtype)
        x = self.vae.decode(z).sample.float().clamp(-1.0, 1.0)
        # CogVideoX decodes latents in pairs and is trained on an odd T' (T = 8k+1): for an
        # even T' it expands the first latent frame to 4 frames; keep the last of them.
        return x[:, :, x.shape[2] - frames :]  # (B, 3, 1 + t(T'-1), H, W)

    def encode_tiled(
        self, x: Tensor, tile_px: int = 256, overlap_px: int = 64, chunk_frames: int = 16
    ) -> Tensor:
        """`encode` with diffusers' own tiling (its seams, its tolerances)."""
        with self._tiling(tile_px, overlap_px, chunk_frames):
            return self.encode(x)

    def decode_tiled(
        self, z: Tensor, tile_px: int = 256, overlap_px: int = 64, chunk_frames: int = 16
    ) -> Tensor:
        with self._tiling(tile_px, overlap_px, chunk_frames):
            return self.decode(z)

    def _tiling(self, tile_px: int, overlap_px: int, chunk_frames: int) -> _Tiling:
        check_tiling(tile_px, overlap_px, chunk_frames, self.spatial_factor, self.temporal_factor)
        return _Tiling(self, tile_px, overlap_px, chunk_frames)


class _Tiling:
    """Context manager: diffusers tiling switched on with our sizes, then restored.

    Wan and CogVideoX already process time in causal chunks of their own (Wan frame by frame
    with a conv cache, CogVideoX in fixed frame batches), so `chunk_frames` only reaches
    HunyuanVideo, whose temporal tiles overlap by one temporal factor.
    """

    _KEYS = (
        "use_tiling", "tile_sample_min_height", "tile_sample_min_width",
        "tile_sample_stride_height", "tile_sample_stride_width",
        "tile_overlap_factor_height", "tile_overlap_factor_width",
        "tile_latent_min_height", "tile_latent_min_width",
        "tile_sample_min_num_frames", "tile_sample_stride_num_frames",
        "tile_latent_min_num_frames", "use_framewise_encoding", "use_framewise_decoding",
    )  # fmt: skip

    def __init__(self, ad: DiffusersVideoVAE, tile: int, overlap: int, chunk: int) -> None:
        self.ad, self.tile, self.overlap, self.chunk = ad, tile, overlap, chunk

    def __enter__(self) -> None:
        vae = self.ad.vae
        self.saved = {k: getattr(vae, k) for k in self._KEYS if hasattr(vae, k)}
        stride = self.tile - self.overlap
        if self.ad.kind == "AutoencoderKLCogVideoX":
            f = self.overlap / self.tile
            vae.enable_tiling(self.tile, self.tile, f, f)
        elif self.ad.kind == "AutoencoderKLHunyuanVideo":
            t = self.ad.temporal_factor
            vae.enable_tiling(
                self.tile, self.tile, self.chunk, stride, stride, max(self.chunk - t, t)
            )
        else:
            vae.enable_tiling(self.tile, self.tile, stride, stride)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            setattr(self.ad.vae, k, v)


def find_diffusers_vae(local_dir: str | Path) -> tuple[Path, str]:
    """(the folder holding config.json, its `_class_name`) for a supported diffusers video VAE
    in `local_dir` (a VAE folder or a pipeline folder with a `vae/` subfolder); reads only the
    JSON, so a wrong folder is refused without importing diffusers or loading weights.
    FileNotFoundError (no config.json) or ValueError (not JSON, an unsupported class)."""
    import json

    root = Path(local_dir)
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{root} holds no diffusers VAE: expected {root}/config.json or "
            f"{root}/vae/config.json naming one of {', '.join(SUPPORTED)}"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{config_path} is not JSON ({e}); expected a diffusers config naming one of "
            f"{', '.join(SUPPORTED)}"
        ) from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SUPPORTED:
        raise ValueError(
            f"{config_path} is a {name!r}; supported video VAEs: {', '.join(SUPPORTED)}"
        )
    return folder, name


def load_diffusers_vae(
    local_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusersVideoVAE:
    """Load a supported diffusers video VAE from `local_dir` (a VAE folder or a pipeline
    folder with a `vae/` subfolder); the class is read from its config.json."""
    folder, name = find_diffusers_vae(local_dir)
    require_safetensors(folder, "VAE folder")
    diffusers = _import_diffusers()
    import importlib.util

    # without accelerate, diffusers falls back to a plain load with a warning on every start
    quick = importlib.util.find_spec("accelerate") is not None
    vae = getattr(diffusers, name).from_pretrained(
        str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True,
        low_cpu_mem_usage=quick,
    )
    return DiffusersVideoVAE(vae.to(device))
