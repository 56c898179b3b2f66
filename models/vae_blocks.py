"""Building blocks of the causal 3D video VAE (see models/vae.py for the model and its API).

Every block takes an optional `cache`: a dict, owned by the caller, in which each causal conv
keeps the last input frames it still needs. Passing the same dict across consecutive time
chunks makes a chunked pass equal to one pass over the whole clip (up to float rounding):
convolutions only look at the past, and normalisation is per position (no statistics over
time or space), so nothing else couples frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Cache = dict[nn.Module, Tensor]


def space_to_channel(x: Tensor, p: int) -> Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p); a lossless spatial patchify."""
    if p == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // p, p, W // p, p)  # (B, C, T, h, p, w, p)
    x = x.permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, p, p, T, h, w)
    return x.reshape(B, C * p * p, T, H // p, W // p)  # (B, C*p*p, T, h, w)


def channel_to_space(x: Tensor, p: int) -> Tensor:
    """(B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p); inverse of `space_to_channel`."""
    if p == 1:
        return x
    B, Cpp, T, h, w = x.shape
    C = Cpp // (p * p)
    x = x.reshape(B, C, p, p, T, h, w)  # (B, C, p, p, T, h, w)
    x = x.permute(0, 1, 4, 5, 2, 6, 3)  # (B, C, T, h, p, w, p)
    return x.reshape(B, C, T, h * p, w * p)  # (B, C, T, H, W)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position, as in the Wan and LTX video VAEs.

    Unlike GroupNorm it uses no statistics over time or space, so the model stays causal,
    time chunks are exact, and spatial tiles differ from a full pass only through conv padding.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        rms = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)  # (B, 1, T, H, W)
        return x * rms * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the past side only (spatial 'same' zero padding).

    Output frame t sees input frames <= t*stride. With no cache (or on the first chunk) the
    past is the first frame repeated, so a single image is encoded like a still video.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)
    ) -> None:
        super().__init__()
        self.time_pad = kernel - 1
        self.time_stride = stride[0]
        pad = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, pad, pad))

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.time_pad:
            past = cache.get(self) if cache is not None else None
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # (B, C, k-1, H, W)
            x = torch.cat([past, x], dim=2)  # (B, C, k-1+T, H, W)
        y = self.conv(x)
        if cache is not None and self.time_pad:
            # Keep the input frames the next output frame will start from.
            cache[self] = x[:, :, y.shape[2] * self.time_stride :].detach().clone()
        return y


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halves H and W; halves time too when `time_stride == 2` (T = 1+2k -> 1+k)."""

    def __init__(self, channels: int, time_stride: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=(time_stride, 2, 2))

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Doubles H and W; with `time_stride == 2` maps T = 1+k -> 1+2k.

    Each frame is repeated in time, except the clip's very first frame, which stays alone:
    the mirror of the encoder, where the first frame is compressed on its own.
    """

    def __init__(self, channels: int, time_stride: int) -> None:
        super().__init__()
        self.time_stride = time_stride
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T, 2H, 2W)
        if self.time_stride == 2:
            first_chunk = cache is None or self not in cache
            x = x.repeat_interleave(2, dim=2)  # (B, C, 2T, 2H, 2W)
            if first_chunk:
                x = x[:, :, 1:]  # (B, C, 2T-1, 2H, 2W)
            if cache is not None:
                cache[self] = x.new_empty(0)  # marks "first chunk done"
        return self.conv(x, cache)


class Encoder(nn.Module):
    """(B, in_ch, T, H, W) -> (B, 2*z, T', H', W'): mean and log-variance of the posterior."""

    def __init__(
        self,
        in_channels: int,
        z_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        temporal_strides: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, channels[0])
        self.stages = nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, c))
                cin = c
            if i < len(channels) - 1:
                blocks.append(Downsample(c, temporal_strides[i]))
            self.stages.append(nn.ModuleList(blocks))
        self.mid = ResBlock(cin, cin)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * z_channels)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv_in(x, cache)
        for stage in self.stages:
            for block in stage:
                h = block(h, cache)
        h = self.mid(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    """(B, z, T', H', W') -> (B, out_ch, T, H, W); the encoder mirrored."""

    def __init__(
        self,
        out_channels: int,
        z_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: int,
        temporal_strides: tuple[int, ...],
    ) -> None:
        super().__init__()
        cin = channels[-1]
        self.conv_in = CausalConv3d(z_channels, cin)
        self.mid = ResBlock(cin, cin)
        self.stages = nn.ModuleList()
        for i in reversed(range(len(channels))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, channels[i]))
                cin = channels[i]
            if i > 0:
                blocks.append(Upsample(cin, temporal_strides[i - 1]))
            self.stages.append(nn.ModuleList(blocks))
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, out_channels)

    def forward(self, z: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.mid(self.conv_in(z, cache), cache)
        for stage in self.stages:
            for block in stage:
                h = block(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


@dataclass
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)), in the VAE's raw (unscaled) latent space."""

    mean: Tensor  # (B, C, T', H', W')
    logvar: Tensor  # (B, C, T', H', W')

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, C, T', H', W')
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per latent element, shape (B, C, T', H', W')."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


# ---- spatial tiling helpers -------------------------------------------------------------


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, size); the last tile is pulled back to end at `size`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, overlap: int, left: bool, right: bool) -> Tensor:
    """1D weights: 1 in the middle, a linear ramp over `overlap` on sides with a neighbour."""
    w = torch.ones(length)
    n = min(overlap, length)
    if n > 0:
        ramp = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        if left:
            w[:n] *= ramp
        if right:
            w[length - n :] *= ramp.flip(0)
    return w


def check_tiling(tile_px: int, overlap_px: int, chunk_frames: int, s: int, t: int) -> None:
    if tile_px <= 0 or tile_px % s or overlap_px % s or not 0 <= overlap_px < tile_px:
        raise ValueError(
            f"tile_px={tile_px}, overlap_px={overlap_px}: both must be multiples of {s} "
            "with 0 <= overlap_px < tile_px"
        )
    if chunk_frames <= 0 or chunk_frames % t:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of {t}")


def tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float
) -> Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` and blend the outputs linearly.

    `tile` and `overlap` are in `x`'s pixels; `fn` maps an (h, w) tile to (h*scale, w*scale).
    """
    H, W = x.shape[-2:]
    Ho, Wo, ov = round(H * scale), round(W * scale), round(overlap * scale)
    out = weight = None
    for y0 in tile_starts(H, tile, tile - overlap):
        for x0 in tile_starts(W, tile, tile - overlap):
            y = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])  # (B, C, T, h, w)
            oy, ox = round(y0 * scale), round(x0 * scale)
            h, w = y.shape[-2:]
            if out is None:
                out = y.new_zeros(*y.shape[:-2], Ho, Wo)  # (B, C, T, Ho, Wo)
                weight = y.new_zeros(Ho, Wo)
            wy = blend_ramp(h, ov, left=oy > 0, right=oy + h < Ho)
            wx = blend_ramp(w, ov, left=ox > 0, right=ox + w < Wo)
            w2 = (wy[:, None] * wx[None, :]).to(y)  # (h, w)
            out[..., oy : oy + h, ox : ox + w] += y * w2
            weight[oy : oy + h, ox : ox + w] += w2
    return out / weight
