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
    `kernel` is k (a k x k x k cube) or (kt, kh, kw).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int] = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.time_pad = kt - 1
        self.time_stride = stride[0]
        self.conv = nn.Conv3d(cin, cout, (kt, kh, kw), stride=stride,
                              padding=(0, kh // 2, kw // 2))

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


class FactorizedConv3d(nn.Module):
    """A 1x3x3 spatial conv, then a causal 3x1x1 temporal conv (R(2+1)D-style): 12 C^2
    weights instead of a 3x3x3 cube's 27 C^2, and a nonlinearity-free spatial/temporal split
    that trains faster at equal width. Same causal cache contract as `CausalConv3d`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1))
        self.temporal = CausalConv3d(cout, cout, (3, 1, 1))

    @property
    def last(self) -> nn.Conv3d:
        return self.temporal.conv

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        return self.temporal(self.spatial(x), cache)


def conv3(cin: int, cout: int, factorized: bool) -> nn.Module:
    return FactorizedConv3d(cin, cout) if factorized else CausalConv3d(cin, cout)


def last_conv(m: nn.Module) -> nn.Conv3d:
    """The conv whose weights set a (possibly factorized) conv block's output."""
    return m.last if isinstance(m, FactorizedConv3d) else m.conv


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, factorized: bool = False) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = conv3(cin, cout, factorized)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = conv3(cout, cout, factorized)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Divides H and W by `space_stride` (1 or 2); halves time too when `time_stride == 2`
    (T = 1+2k -> 1+k)."""

    def __init__(self, channels: int, time_stride: int, space_stride: int = 2) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels,
                                 stride=(time_stride, space_stride, space_stride))

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Multiplies H and W by `space_stride`; with `time_stride == 2` maps T = 1+k -> 1+2k.

    Each frame is repeated in time, except the clip's very first frame, which stays alone:
    the mirror of the encoder, where the first frame is compressed on its own.
    """

    def __init__(self, channels: int, time_stride: int, space_stride: int = 2) -> None:
        super().__init__()
        self.time_stride, self.space_stride = time_stride, space_stride
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        s = self.space_stride
        if s > 1:
            x = F.interpolate(x, scale_factor=(1, s, s), mode="nearest")  # (B, C, T, sH, sW)
        if self.time_stride == 2:
            first_chunk = first_call(self, cache)
            x = x.repeat_interleave(2, dim=2)  # (B, C, 2T, sH, sW)
            if first_chunk:
                x = x[:, :, 1:]  # (B, C, 2T-1, sH, sW)
        return self.conv(x, cache)


def first_call(module: nn.Module, cache: Cache | None) -> bool:
    """True on a clip's first time chunk (no cache, or `module` not yet seen in it)."""
    first = cache is None or module not in cache
    if cache is not None:
        cache[module] = torch.empty(0)  # marks "first chunk done"
    return first


def space_time_to_channel(x: Tensor, s: int, t: int, first: bool) -> Tensor:
    """(B, C, T, H, W) -> (B, C*t*s*s, T', H/s, W/s), lossless; t in (1, 2).

    With t = 2 frames pair causally, (2j-1, 2j): on a clip's first chunk (`first`) frame 0
    is paired with itself, so T = 1+2k -> 1+k; later chunks hold an even number of frames.
    Channel order: c * (t*s*s) + (dt * s*s + dy * s + dx), so consecutive channel groups of
    size <= t*s*s come from one input channel.
    """
    if t == 2 and first:
        x = torch.cat([x[:, :, :1], x], dim=2)  # (B, C, 2+2k, H, W)
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // t, t, H // s, s, W // s, s)  # (B, C, T', t, h, s, w, s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, t, s, s, T', h, w)
    return x.reshape(B, C * t * s * s, T // t, H // s, W // s)


def channel_to_space_time(x: Tensor, s: int, t: int, first: bool) -> Tensor:
    """Inverse of `space_time_to_channel`: (B, C*t*s*s, T', h, w) -> (B, C, T, h*s, w*s),
    dropping the duplicated frame 0 on a clip's first chunk (T' = 1+k -> 1+2k)."""
    B, Cts, T, h, w = x.shape
    C = Cts // (t * s * s)
    x = x.reshape(B, C, t, s, s, T, h, w)  # (B, C, t, s, s, T', h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, C, T', t, h, s, w, s)
    x = x.reshape(B, C, T * t, h * s, w * s)
    return x[:, :, 1:] if t == 2 and first else x


def average_groups(x: Tensor, cout: int) -> Tensor:
    """(B, C, ...) -> (B, cout, ...): the mean of each run of C / cout consecutive channels."""
    B, C = x.shape[:2]
    return x.reshape(B, cout, C // cout, *x.shape[2:]).mean(dim=2)


class ShortcutDown(nn.Module):
    """DC-AE's residual down block, made causal: a conv to cout / (t s^2) channels at full
    resolution, then space(-and-time)-to-channel to cout, plus a parameter-free shortcut that
    moves the input to channels the same way and averages channel groups down to cout. The
    block starts as a good downsampler (the shortcut) and learns the residual."""

    def __init__(self, cin: int, cout: int, time_stride: int, space_stride: int) -> None:
        super().__init__()
        self.s, self.t = space_stride, time_stride
        factor = time_stride * space_stride**2
        if cout % factor or (cin * factor) % cout:
            raise ValueError(f"shortcut down block {cin} -> {cout} channels at {time_stride}x"
                             f"{space_stride}x{space_stride}: cout must be a multiple of "
                             f"{factor} and cin * {factor} a multiple of cout")
        self.conv = CausalConv3d(cin, cout // factor)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        first = first_call(self, cache)
        h = space_time_to_channel(self.conv(x, cache), self.s, self.t, first)
        shortcut = space_time_to_channel(x, self.s, self.t, first)
        return h + average_groups(shortcut, h.shape[1])


class ShortcutUp(nn.Module):
    """The mirror of `ShortcutDown`: a conv to cout * t s^2 channels at low resolution, then
    channel-to-space(-and-time), plus a shortcut that repeats each input channel and moves
    channels to space and time the same way. With `factorized`, the conv is 1x3x3 (a third
    of the weights and FLOPs of the cube; the neighbouring ResBlocks' temporal convs and the
    shortcut's repeat carry time)."""

    def __init__(self, cin: int, cout: int, time_stride: int, space_stride: int,
                 factorized: bool = False) -> None:
        super().__init__()
        self.s, self.t = space_stride, time_stride
        factor = time_stride * space_stride**2
        if (cout * factor) % cin:
            raise ValueError(f"shortcut up block {cin} -> {cout} channels at {time_stride}x"
                             f"{space_stride}x{space_stride}: cout * {factor} must be a "
                             "multiple of cin")
        self.repeats = cout * factor // cin
        self.conv = CausalConv3d(cin, cout * factor, (1, 3, 3) if factorized else 3)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        first = first_call(self, cache)
        h = self.conv(x, cache) + x.repeat_interleave(self.repeats, dim=1)
        return channel_to_space_time(h, self.s, self.t, first)


@dataclass(frozen=True)
class Levels:
    """The encoder/decoder layout shared by both halves (fields of VAEConfig)."""

    channels: tuple[int, ...]
    num_res_blocks: int
    temporal_strides: tuple[int, ...]
    spatial_strides: tuple[int, ...]
    shortcut: bool = False
    factorized: bool = False


class Encoder(nn.Module):
    """(B, in_ch, T, H, W) -> (B, 2*z, T', H', W'): mean and log-variance of the posterior.

    With `levels.shortcut`, each down step is a `ShortcutDown` into the next level's width and
    the posterior mean adds the last features averaged to z channels (DC-AE's shortcuts);
    otherwise a same-width strided conv, the next level's first ResBlock changing width.
    """

    def __init__(self, in_channels: int, z_channels: int, levels: Levels) -> None:
        super().__init__()
        ch, f = levels.channels, levels.factorized
        self.z_channels, self.shortcut = z_channels, levels.shortcut
        self.conv_in = CausalConv3d(in_channels, ch[0])
        self.stages = nn.ModuleList()
        cin = ch[0]
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = []
            for _ in range(levels.num_res_blocks):
                blocks.append(ResBlock(cin, c, f))
                cin = c
            if i < len(ch) - 1:
                t, s = levels.temporal_strides[i], levels.spatial_strides[i]
                if levels.shortcut:
                    blocks.append(ShortcutDown(c, ch[i + 1], t, s))
                    cin = ch[i + 1]
                else:
                    blocks.append(Downsample(c, t, s))
            self.stages.append(nn.ModuleList(blocks))
        self.mid = ResBlock(cin, cin, f)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * z_channels)
        if levels.shortcut and cin % z_channels:
            raise ValueError(f"shortcut encoder: last width {cin} must be a multiple of the "
                             f"{z_channels} latent channels")

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv_in(x, cache)
        for stage in self.stages:
            for block in stage:
                h = block(h, cache)
        h = self.mid(h, cache)
        moments = self.conv_out(F.silu(self.norm_out(h)), cache)
        if self.shortcut:  # the mean starts as the features averaged to z channels
            mean, logvar = moments.chunk(2, dim=1)
            moments = torch.cat([mean + average_groups(h, self.z_channels), logvar], dim=1)
        return moments


class Decoder(nn.Module):
    """(B, z, T', H', W') -> (B, out_ch, T, H, W); the encoder mirrored."""

    def __init__(self, out_channels: int, z_channels: int, levels: Levels) -> None:
        super().__init__()
        ch, f = levels.channels, levels.factorized
        cin = ch[-1]
        self.repeats = cin // z_channels if levels.shortcut else 0
        self.conv_in = CausalConv3d(z_channels, cin)
        self.mid = ResBlock(cin, cin, f)
        self.stages = nn.ModuleList()
        for i in reversed(range(len(ch))):
            blocks: list[nn.Module] = []
            for _ in range(levels.num_res_blocks):
                blocks.append(ResBlock(cin, ch[i], f))
                cin = ch[i]
            if i > 0:
                t, s = levels.temporal_strides[i - 1], levels.spatial_strides[i - 1]
                if levels.shortcut:
                    blocks.append(ShortcutUp(cin, ch[i - 1], t, s, f))
                    cin = ch[i - 1]
                else:
                    blocks.append(Upsample(cin, t, s))
            self.stages.append(nn.ModuleList(blocks))
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, out_channels)

    def forward(self, z: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv_in(z, cache)
        if self.repeats:  # DC-AE: the latent, repeated to the decoder's width
            h = h + z.repeat_interleave(self.repeats, dim=1)
        h = self.mid(h, cache)
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
