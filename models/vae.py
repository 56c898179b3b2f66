"""Causal 3D video VAE: 4x temporal and 8x spatial compression into a Gaussian latent.

Our own small architecture in the family of the Open-Sora / CogVideoX / Wan / LTX causal VAEs:
a lossless 2x2 pixel-unshuffle, then causal 3D convolutions (time padded on the past side
only), per-position RMS norm (as Wan and LTX; no statistics over time or space), SiLU,
residual blocks, strided-conv downsampling and nearest-neighbour upsampling, no attention.
Causality means the first frame is encoded alone: T = 1 + 4k frames -> 1 + k latent frames,
and a single image (T=1) is a one-frame video.

Training: `model(x)` -> (recon, posterior), then `vae_loss`; AdamW at lr ~1e-4 (the 128-wide
3D convs oscillate at 2.5e-4 and above), then `fit_scaling` on a few batches before saving.

Latent contract (shared with the diffusers adapters in models/vae_adapters.py): pixels are
float in [-1, 1], (B, 3, T, H, W); `encode` returns (B, C, T', H', W') already normalised,
`(z - shift_factor) * scaling_factor`, so the DiT sees roughly unit variance; `decode` undoes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from models.metrics import psnr
from models.vae_blocks import (
    Cache,
    Decoder,
    DiagonalGaussian,
    Encoder,
    Levels,
    ResBlock,
    ShortcutDown,
    ShortcutUp,
    channel_to_space,
    check_tiling,
    last_conv,
    space_to_channel,
    tiled,
)

CHECKPOINT_FORMAT = "tubelet.vae/1"


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    # Spatial factor = patch_size * 2 ** (len(channels) - 1); temporal = prod(temporal_strides).
    patch_size: int = 2  # lossless pixel-unshuffle before the first conv: 4x cheaper level 0
    channels: tuple[int, ...] = (64, 128, 128)  # width per level; a 2x down between levels
    num_res_blocks: int = 1  # per level, in encoder and decoder
    temporal_strides: tuple[int, ...] = (2, 2)  # per down/up step: 1 or 2
    # Per down/up step: 1 or 2; () = all 2s. (2, 1) with patch_size 4: one space+time step,
    # then a time-only one.
    spatial_strides: tuple[int, ...] = ()
    shortcut: bool = False  # DC-AE residual autoencoding shortcuts (models/vae_blocks.py)
    factorized: bool = False  # ResBlock convs as 1x3x3 spatial then 3x1x1 causal temporal
    # Latent normalisation, set by VideoVAE.fit_scaling after training: (z - shift) * scaling.
    # One float each (one scale for all channels), or one value per latent channel (Wan's
    # latents_mean / 1 / latents_std): a DiT's noise has std 1 in every channel, so a channel
    # 3x quieter than the rest would sit 9x deeper in the noise at every flow time.
    scaling_factor: float | tuple[float, ...] = 1.0
    shift_factor: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        for key in ("scaling_factor", "shift_factor"):  # one per channel: a tuple
            if isinstance(getattr(self, key), list | tuple):
                setattr(self, key, tuple(float(v) for v in getattr(self, key)))

    def validate(self) -> None:
        """Value rules; the config loader and `VideoVAE` call it (as every config's)."""
        if len(self.temporal_strides) != len(self.channels) - 1:
            raise ValueError(
                f"VAEConfig.temporal_strides has {len(self.temporal_strides)} entries; it needs "
                f"one per down step, len(channels) - 1 = {len(self.channels) - 1}"
            )
        if any(s not in (1, 2) for s in self.temporal_strides):
            raise ValueError(
                f"VAEConfig.temporal_strides must be 1s and 2s, got {self.temporal_strides}"
            )
        if self.spatial_strides and (
            len(self.spatial_strides) != len(self.temporal_strides)
            or any(s not in (1, 2) for s in self.spatial_strides)
        ):
            raise ValueError(
                f"VAEConfig.spatial_strides must be () or one 1 or 2 per down step, got "
                f"{self.spatial_strides}"
            )
        if self.patch_size < 1 or self.num_res_blocks < 1 or self.latent_channels < 1:
            raise ValueError("VAEConfig.patch_size, num_res_blocks, latent_channels must be >= 1")
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != self.latent_channels:
                raise ValueError(f"VAEConfig.{key} has {len(value)} values; give one float or "
                                 f"one per latent channel ({self.latent_channels})")

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_strides)

    @property
    def strides(self) -> tuple[int, ...]:
        """Spatial stride of each down/up step."""
        return self.spatial_strides or (2,) * len(self.temporal_strides)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * math.prod(self.strides)

    def levels(self) -> Levels:
        return Levels(self.channels, self.num_res_blocks, self.temporal_strides, self.strides,
                      self.shortcut, self.factorized)

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown VAEConfig key {key!r}; known keys: {sorted(known)}")
        d = dict(d)
        for key in ("channels", "temporal_strides", "spatial_strides"):  # JSON gives lists
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        config = cls(**d)
        config.validate()
        return config


def _debug() -> VAEConfig:
    return VAEConfig(latent_channels=4, channels=(8, 16, 16))


def _default() -> VAEConfig:
    return VAEConfig(latent_channels=16, channels=(64, 128, 128))


def _dc() -> VAEConfig:
    """The residual-autoencoding design: a 4x4 patchify input (LTX: the energy of
    each 4x4 block moves into channels before any conv), one space+time and one time-only
    down step wrapped in DC-AE's parameter-free shortcuts, factorized 1x3x3 + 3x1x1 convs."""
    return VAEConfig(latent_channels=16, patch_size=4, channels=(64, 128, 128),
                     temporal_strides=(2, 2), spatial_strides=(2, 1), shortcut=True,
                     factorized=True)


def _dc_debug() -> VAEConfig:
    return replace(_dc(), latent_channels=4, channels=(8, 16, 32))


PRESETS: dict[str, Callable[[], VAEConfig]] = {
    "debug": _debug, "default": _default, "dc": _dc, "dc-debug": _dc_debug}


def build_vae(preset: str = "default", **overrides: object) -> VideoVAE:
    """A fresh model from a preset, e.g. `build_vae("debug", latent_channels=8)`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]()
    if overrides:
        config = VAEConfig.from_dict({**asdict(config), **overrides})
    return VideoVAE(config)


@runtime_checkable
class VideoAutoencoder(Protocol):
    """What the pipeline needs from any video autoencoder (ours or a diffusers adapter).

    `scaling_factor` / `shift_factor` are floats, or per-channel tensors of shape (C,).
    """

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    scaling_factor: float | Tensor
    shift_factor: float | Tensor

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def encode_tiled(
        self, x: Tensor, tile_px: int = 256, overlap_px: int = 64, chunk_frames: int = 16
    ) -> Tensor: ...

    def decode_tiled(
        self, z: Tensor, tile_px: int = 256, overlap_px: int = 64, chunk_frames: int = 16
    ) -> Tensor: ...


def check_video(x: Tensor, temporal_factor: int, spatial_factor: int, channels: int = 3) -> None:
    """Raise a ValueError naming the shape when `x` is not a (B, C, 1+tk, sH, sW) video."""
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"expected a video tensor (B, {channels}, T, H, W), got {tuple(x.shape)}")
    T, H, W = x.shape[2:]
    if (T - 1) % temporal_factor:
        raise ValueError(
            f"video of shape {tuple(x.shape)} has T={T} frames; the VAE needs T = 1 + "
            f"{temporal_factor}k (1, {1 + temporal_factor}, {1 + 2 * temporal_factor}, ...)"
        )
    if H % spatial_factor or W % spatial_factor:
        raise ValueError(
            f"video of shape {tuple(x.shape)} is {H}x{W}; height and width must be multiples "
            f"of {spatial_factor} (nearest below: {H // spatial_factor * spatial_factor}x"
            f"{W // spatial_factor * spatial_factor})"
        )


def check_latent(z: Tensor, latent_channels: int) -> None:
    if z.ndim != 5 or z.shape[1] != latent_channels:
        raise ValueError(
            f"expected a latent (B, {latent_channels}, T', H', W'), got {tuple(z.shape)}"
        )


class VideoVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        p2 = config.patch_size**2
        levels = config.levels()
        self.encoder = Encoder(config.in_channels * p2, config.latent_channels, levels)
        self.decoder = Decoder(config.in_channels * p2, config.latent_channels, levels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                # LeCun-normal weights, zero biases: each conv keeps its input's scale. With
                # PyTorch's default init the main path shrinks ~1.7x per conv, the biases drown
                # the input after a few levels, and training stalls for hundreds of steps.
                fan_in = m.in_channels * math.prod(m.kernel_size)
                nn.init.normal_(m.weight, std=fan_in**-0.5)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                # Each residual branch starts at zero: every block starts as the identity.
                nn.init.zeros_(last_conv(m.conv2).weight)
            if isinstance(m, ShortcutDown | ShortcutUp):
                # DC-AE blocks start as their parameter-free shortcut (a plain down/upsample).
                nn.init.zeros_(m.conv.conv.weight)
        if self.config.shortcut:  # the latent starts as the averaged features, and back
            nn.init.zeros_(self.encoder.conv_out.conv.weight[: self.latent_channels])
            nn.init.zeros_(self.decoder.conv_in.conv.weight)
        # Start the posterior nearly deterministic (std e^-2): with logvar ~ 0 the sampling noise
        # swamps the still-small means and the decoder first learns to ignore its input.
        bias = self.encoder.conv_out.conv.bias
        nn.init.zeros_(bias[: self.latent_channels])
        nn.init.constant_(bias[self.latent_channels :], -4.0)

    # ---- the VideoAutoencoder interface -------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def scaling_factor(self) -> float | Tensor:
        """A float, or per channel a (C,) tensor (the VideoAutoencoder protocol)."""
        return _per_channel(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float | Tensor:
        return _per_channel(self.config.shift_factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent for a (frames, height, width) video."""
        t, s = self.temporal_factor, self.spatial_factor
        return (self.latent_channels, 1 + (frames - 1) // t, height // s, width // s)

    def encode_posterior(self, x: Tensor, cache: Cache | None = None) -> DiagonalGaussian:
        """Raw (unscaled) posterior. With `cache`, `x` may be one time chunk of a longer clip."""
        if cache is None:
            check_video(x, self.temporal_factor, self.spatial_factor, self.config.in_channels)
        moments = self.encoder(space_to_channel(x, self.config.patch_size), cache)
        return DiagonalGaussian.from_moments(moments)  # (B, C, T', H', W') each

    def decode_raw(self, z: Tensor, cache: Cache | None = None) -> Tensor:
        """Raw latent -> pixels, unclamped (the training path)."""
        check_latent(z, self.latent_channels)
        return channel_to_space(self.decoder(z, cache), self.config.patch_size)

    def scale_latent(self, z: Tensor) -> Tensor:
        return scale_latent(z, self.scaling_factor, self.shift_factor)

    def unscale_latent(self, z: Tensor) -> Tensor:
        return unscale_latent(z, self.scaling_factor, self.shift_factor)

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> scaled latent (B, C, 1+(T-1)/4, H/8, W/8)."""
        posterior = self.encode_posterior(x)
        return self.scale_latent(posterior.sample(generator) if sample else posterior.mode())

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, C, T', H', W') -> pixels (B, 3, 1+4(T'-1), 8H', 8W') in [-1, 1]."""
        return self.decode_raw(self.unscale_latent(z)).clamp(-1.0, 1.0)

    def forward(self, x: Tensor) -> tuple[Tensor, DiagonalGaussian]:
        """Training pass: (unclamped reconstruction, posterior)."""
        posterior = self.encode_posterior(x)
        return self.decode_raw(posterior.sample()), posterior

    # ---- bounded-memory encode / decode ------------------------------------------------
    @torch.no_grad()
    def encode_tiled(
        self,
        x: Tensor,
        tile_px: int = 256,
        overlap_px: int = 64,
        chunk_frames: int = 16,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`encode` over overlapping spatial tiles and causal time chunks (memory is bounded
        by one tile x one chunk, plus each causal conv's cache of <= 2 past frames).

        Time chunks (1 + chunk_frames, then chunk_frames frames) carry each causal conv's past
        frames across chunks: chunking alone is exact (tests: max abs diff <= 1e-5, float32).
        Spatial tiles are blended linearly over `overlap_px` and differ from a full pass near
        seams, where tile edges see zero padding instead of their neighbours. Measured:
        - default preset, 256 px frame, 128 px tiles, 64 px overlap: latent RMS diff 0.07x the
          latent std, decoded PSNR between tiled and untiled 41.7 dB (max abs 0.14); with
          every conv at PyTorch's random init, 0.11x std and 34.8 dB.
        - debug preset, every conv at PyTorch's random init (worst case), 128 px frame, 64 px
          tiles, 32 px overlap: 0.25x std (max 1.03x) and 27.2 dB (max abs 0.47);
          tests/unit/test_vae.py asserts < 0.4x std and > 24 dB there.
        Not yet measured on a trained model; larger tiles and overlaps shrink the seams.
        """
        check_video(x, self.temporal_factor, self.spatial_factor, self.config.in_channels)
        check_tiling(tile_px, overlap_px, chunk_frames, self.spatial_factor, self.temporal_factor)
        moments = tiled(
            lambda tile: self._stream(tile, chunk_frames, self._encode_chunk),
            x,
            tile_px,
            overlap_px,
            1 / self.spatial_factor,
        )
        posterior = DiagonalGaussian.from_moments(moments)
        return self.scale_latent(posterior.sample(generator) if sample else posterior.mode())

    @torch.no_grad()
    def decode_tiled(
        self, z: Tensor, tile_px: int = 256, overlap_px: int = 64, chunk_frames: int = 16
    ) -> Tensor:
        """`decode` over overlapping spatial tiles and causal time chunks (sizes in pixels).

        Same tolerances as `encode_tiled`: time chunks are exact up to float rounding, tiles
        differ near seams (numbers there).
        """
        check_latent(z, self.latent_channels)
        s, t = self.spatial_factor, self.temporal_factor
        check_tiling(tile_px, overlap_px, chunk_frames, s, t)
        z = self.unscale_latent(z)
        x = tiled(
            lambda tile: self._stream(tile, chunk_frames // t, self.decode_raw),
            z,
            tile_px // s,
            overlap_px // s,
            s,
        )
        return x.clamp(-1.0, 1.0)

    def _encode_chunk(self, x: Tensor, cache: Cache) -> Tensor:
        return self.encoder(space_to_channel(x, self.config.patch_size), cache)

    @staticmethod
    def _stream(x: Tensor, chunk: int, fn: Callable[[Tensor, Cache], Tensor]) -> Tensor:
        """Run `fn` over time chunks [0, 1+chunk), [1+chunk, 1+2*chunk), ... with one cache."""
        cache: Cache = {}
        T = x.shape[2]
        bounds = [0, *range(1 + chunk, T, chunk), T]
        outs = [fn(x[:, :, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(outs, dim=2)  # (B, C, T_out, H, W)

    # ---- latent normalisation ------------------------------------------------------------
    @torch.no_grad()
    def fit_scaling(self, videos: Iterable[Tensor], per_channel: bool = False
                    ) -> tuple[float | Tensor, float | Tensor]:
        """Set shift/scaling so encoded latents of `videos` have mean 0 and std 1, over all
        channels together or (`per_channel`) in each channel.

        Call after training, on a few representative batches; save_vae stores the result.
        """
        stats = [latent_moments(self.encode_posterior(x).mode()) for x in videos]
        if not stats:
            raise ValueError("fit_scaling got no videos")
        mean, std = moments_to_stats(*(sum(v) for v in zip(*stats, strict=True)), per_channel)
        pick = (lambda v: tuple(v.tolist())) if per_channel else (lambda v: v.item())
        self.config = replace(self.config, shift_factor=pick(mean), scaling_factor=pick(1 / std))
        return self.scaling_factor, self.shift_factor

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def latent_moments(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sum, sum of squares and count (float64, (C,) each) of latents (B, C, ...)."""
    z = z.double().transpose(0, 1).flatten(1)  # (C, N)
    return z.sum(1), z.square().sum(1), torch.full_like(z[:, 0], z.shape[1])


def moments_to_stats(total: Tensor, total_sq: Tensor, count: Tensor, per_channel: bool
                     ) -> tuple[Tensor, Tensor]:
    """Mean and std from `latent_moments` sums: per channel ((C,) each), or one value over
    all channels (0-d)."""
    if not per_channel:
        total, total_sq, count = total.sum(), total_sq.sum(), count.sum()
    mean = total / count
    return mean, (total_sq / count - mean**2).clamp(min=1e-12).sqrt()


def as_floats(value: float | tuple[float, ...] | Tensor) -> list[float]:
    """Scaling / shift (a config's float or tuple, or a VAE's float or (C,) tensor) as a
    list: one value, or one per channel."""
    if isinstance(value, Tensor):
        return [float(v) for v in value.reshape(-1).tolist()]
    return [float(v) for v in value] if isinstance(value, tuple) else [float(value)]


def _per_channel(value: float | tuple[float, ...]) -> float | Tensor:
    return torch.tensor(value) if isinstance(value, tuple) else value


def _along_channels(value: float | Tensor, z: Tensor) -> float | Tensor:
    """A float as is; a (C,) tensor shaped to broadcast over z's (B, C, ...) channel dim."""
    if isinstance(value, float | int):
        return value
    return value.to(z.device, z.dtype).reshape(1, -1, *([1] * (z.ndim - 2)))


def scale_latent(z: Tensor, scaling: float | Tensor, shift: float | Tensor) -> Tensor:
    """Raw latent (B, C, ...) -> what the DiT sees: (z - shift) * scaling, floats or (C,);
    in float32 (bf16 would round per-channel factors), returned in z's dtype."""
    x = z.float()
    return ((x - _along_channels(shift, x)) * _along_channels(scaling, x)).to(z.dtype)


def unscale_latent(z: Tensor, scaling: float | Tensor, shift: float | Tensor) -> Tensor:
    x = z.float()
    return (x / _along_channels(scaling, x) + _along_channels(shift, x)).to(z.dtype)


# ---- training loss -----------------------------------------------------------------------
def vae_loss(
    x: Tensor,
    recon: Tensor,
    posterior: DiagonalGaussian,
    kl_weight: float = 1e-6,
    grad_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """L1 + kl_weight * KL (both means per element) + optional spatial-gradient L1.

    The gradient term (L1 between finite differences of x and recon) is a cheap stand-in for
    a perceptual loss: it penalises blurred edges that plain L1 tolerates.
    """
    l1 = (recon - x).abs().mean()
    kl = posterior.kl().mean()
    loss = l1 + kl_weight * kl
    if grad_weight:
        dx = lambda v: v[..., :, 1:] - v[..., :, :-1]  # noqa: E731
        dy = lambda v: v[..., 1:, :] - v[..., :-1, :]  # noqa: E731
        grad = (dx(recon) - dx(x)).abs().mean() + (dy(recon) - dy(x)).abs().mean()
        loss = loss + grad_weight * grad
    stats = {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "psnr": psnr(x, recon.detach())}
    return loss, stats


# ---- weights -----------------------------------------------------------------------------
def save_vae(model: VideoVAE, path: str | Path) -> None:
    """Safetensors weights with the VAEConfig as JSON in the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(model.config))}
    save_file(state, str(path), metadata=metadata)


def read_vae_config(path: str | Path) -> VAEConfig:
    """The VAEConfig of a `save_vae` file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT or "config" not in metadata:
        raise ValueError(f"{path} is not a tubelet VAE checkpoint (written by save_vae)")
    return VAEConfig.from_dict(json.loads(metadata["config"]))


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> VideoVAE:
    """Load a `save_vae` file (safetensors: tensors and JSON only, no code runs)."""
    from safetensors.torch import load_file

    config = read_vae_config(path)
    state = load_file(str(path), device=str(device))
    model = VideoVAE(config).to(device)
    model.load_state_dict(state)
    return model.eval()
