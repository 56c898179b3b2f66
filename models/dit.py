"""Video diffusion transformer (DiT) with selectable attention layouts.

Styled after facebookresearch/DiT `models.py`: adaLN-Zero blocks, one `initialize_weights()`,
presets as small functions in a dict. Video specifics:
- tubelet tokens from `models.patching`, 3D rotary positions from `models.rope` (no position
  table, so one set of weights runs on any T x H x W grid);
- attention layouts, one per config (see `LAYOUTS`); every self- and cross-attention goes
  through one `Attention` module, the only place that calls `F.scaled_dot_product_attention`,
  so sequence parallelism (Ulysses all-to-all) can wrap or replace it from outside;
- conditioning: timestep + fps through adaLN-Zero, text through cross-attention, with a
  learned null text for classifier-free guidance (PixArt-style caption embedder).

`model(x, t)` takes latents x (B, C, T, H, W) and flow times t (B,) in [0, 1] and returns a
velocity of x's shape. Plain PyTorch: sharding, activation checkpointing and compilation are
applied from outside (actors/workers/parallelize.py, torchtitan style).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.patching import patchify, unpatchify
from models.rope import apply_rope, rope_freqs


def known(table: dict, name: str, what: str) -> Any:
    """table[name], or a ValueError naming `name` and the known names (a typo in a config)."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}")
    return table[name]


# Attention modes: how one self-attention groups a sample's N tokens, t-major (nt frames x
# S = h*w positions), into independent attention problems; `ATTENTION_MODES` is the one place
# that says so. `group` puts each problem on the batch dim and `ungroup` inverts it. `unit` is
# what one problem holds; sequence parallelism (actors/workers/sequence_parallel.py) shards by
# it, so no problem straddles ranks except full attention's single one (which Ulysses gathers).


@dataclass(frozen=True)
class AttentionMode:
    unit: str  # "tokens" (all N in one problem), "frames" (S each) or "positions" (nt each)
    group: Callable[[torch.Tensor, int], torch.Tensor]  # (B, N, ...), nt -> (B', S', ...)
    ungroup: Callable[[torch.Tensor, int, int], torch.Tensor]  # (B', S', ...), B, nt -> (B, N, ...)


def _per_frame(x: torch.Tensor, nt: int) -> torch.Tensor:
    return x.reshape(x.shape[0] * nt, -1, *x.shape[2:])  # (B*nt, S, ...)


def _per_frame_back(x: torch.Tensor, B: int, nt: int) -> torch.Tensor:
    return x.reshape(B, -1, *x.shape[2:])  # (B, N, ...)


def _per_position(x: torch.Tensor, nt: int) -> torch.Tensor:
    B, N, *rest = x.shape
    x = x.reshape(B, nt, N // nt, *rest).transpose(1, 2)  # (B, S, nt, ...)
    return x.reshape(B * (N // nt), nt, *rest)  # (B*S, nt, ...)


def _per_position_back(x: torch.Tensor, B: int, nt: int) -> torch.Tensor:
    x = x.reshape(B, -1, nt, *x.shape[2:]).transpose(1, 2)  # (B, nt, S, ...)
    return x.reshape(B, -1, *x.shape[3:])  # (B, N, ...)


ATTENTION_MODES = {
    "full": AttentionMode("tokens", lambda x, nt: x, lambda x, B, nt: x),  # one: all N
    "spatial": AttentionMode("frames", _per_frame, _per_frame_back),  # within each frame
    "temporal": AttentionMode("positions", _per_position, _per_position_back),  # across frames
}

# Which self-attention modes each block runs, per layout (the config's `layout`); the pattern
# repeats down the depth:
#   spatial     - within each frame (image DiT applied per frame)
#   temporal    - across frames at one spatial position
#   full3d      - all tokens of the clip (Wan / HunyuanVideo / Open-Sora 2)
#   factorized  - spatial then temporal inside every block (STDiT / Open-Sora 1.x)
#   interleaved - spatial and temporal blocks alternating (Latte)
# A layout only decides how tokens are grouped into attention problems (`ATTENTION_MODES`);
# each problem is then solved by the one `Attention` module, whatever the layout.
LAYOUTS = {
    "spatial": (("spatial",),),
    "temporal": (("temporal",),),
    "full3d": (("full",),),
    "factorized": (("spatial", "temporal"),),
    "interleaved": (("spatial",), ("temporal",)),
}


@dataclass
class DiTConfig:
    in_channels: int = 16  # latent channels (the VAE's)
    patch: tuple[int, ...] = (1, 2, 2)  # (pt, ph, pw) latent cells per token
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    layout: str = "full3d"
    text_dim: int = 512  # width of the text encoder's features
    text_dropout: float = 0.1  # training-time p of swapping the caption for the null text (CFG)
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # Also add the caption's masked mean (after the text projection) to the adaLN input, as
    # SD3 adds its pooled text embedding: global attributes (colour, direction) then steer every
    # block's modulation directly, which a small model trained briefly learns far faster than
    # through cross-attention alone. Off for exports that predate it (they load unchanged).
    pooled_text: bool = False
    # An absolute position signal added to the patch embeddings next to RoPE: "sincos" = fixed
    # 3D sin-cos of the token's (t, h, w) grid index (DiT / Latte / Open-Sora's spatial blocks:
    # a token then knows where in the frame it is, which RoPE's relative angles do not tell);
    # "none" = RoPE alone (exports that predate it load unchanged).
    pos_embed: str = "none"

    def __post_init__(self) -> None:
        self.patch = tuple(self.patch)  # YAML gives lists

    def validate(self) -> None:
        """Raise ValueError naming the bad field (the config loader adds file and key)."""
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints (pt, ph, pw), got {self.patch}")
        known(LAYOUTS, self.layout, "layout")
        if self.pos_embed not in ("none", "sincos"):
            raise ValueError(f"pos_embed must be 'none' or 'sincos', got {self.pos_embed!r}")
        if self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        head_dim = self.hidden // self.heads
        if head_dim % 2 or head_dim < 6:  # 3D RoPE rotates pairs, at least one per axis
            raise ValueError(f"hidden / heads must be even and >= 6, got {head_dim}")
        if self.depth < len(LAYOUTS[self.layout]):  # one whole pattern
            raise ValueError(f"depth must be >= 2 for interleaved, >= 1 otherwise: {self.depth}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}")
        if min(self.in_channels, self.text_dim) < 1 or self.mlp_ratio <= 0:
            raise ValueError("in_channels, text_dim and mlp_ratio must be positive")

    def block_modes(self) -> list[tuple[str, ...]]:
        """The self-attention modes of each block, in order."""
        pattern = known(LAYOUTS, self.layout, "layout")
        return [pattern[i % len(pattern)] for i in range(self.depth)]

    def block_cross_attends(self) -> list[bool]:
        """Whether each block attends to the text. Latte's temporal blocks do not (the text
        enters through its spatial blocks), so neither do interleaved's; every other block does."""
        interleaved = self.layout == "interleaved"
        return [not (interleaved and modes == ("temporal",)) for modes in self.block_modes()]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def mlp(dim: int, hidden: int, out: int | None = None) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out or dim)
    )


class TimestepEmbedder(nn.Module):
    """Scalar per sample (timestep, fps) -> (B, D): sinusoids, then an MLP (as in DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = mlp(freq_dim, hidden, hidden)
        self.mlp[1] = nn.SiLU()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_3d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed absolute embeddings (n, dim) of integer (t, h, w) positions (n, 3): each axis gets
    an even share of `dim` (t the rest) of sin / cos at geometric frequencies (DiT's 2D
    sin-cos, with time as a third axis, as Latte and Open-Sora add)."""
    share = 2 * (dim // 6)
    out = []
    for axis, width in enumerate((dim - 2 * share, share, share)):
        freqs = 10000.0 ** (-torch.arange(width // 2, device=positions.device,
                                          dtype=torch.float64) / max(width // 2, 1))
        angle = positions[:, axis, None].double() * freqs  # (n, width // 2)
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, dim=-1).float()  # (n, dim)


class TextEmbedder(nn.Module):
    """Text features (B, L, text_dim) -> (B, L, D), with a learned null text for CFG.

    A dropped sample (training dropout, or the unconditional half of CFG) sees a single null
    token: its features become the null vector and its mask keeps only the first position.
    `text=None` gives exactly the same null context.
    """

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.proj = mlp(text_dim, hidden, hidden)
        self.null = nn.Parameter(torch.zeros(text_dim))

    def forward(
        self,
        text: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch: int,
        drop: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if text is None:
            text = self.null.expand(batch, 1, -1)  # (B, 1, text_dim)
            drop = mask = None
        B, L, _ = text.shape
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
        if drop is not None:
            first = torch.arange(L, device=text.device) == 0  # (L,)
            text = torch.where(drop[:, None, None], self.null.to(text.dtype), text)
            mask = torch.where(drop[:, None], first[None], mask.bool())
        return self.proj(text), mask.bool()


class Attention(nn.Module):
    """softmax(q k^T / sqrt(hd)) v on (B', heads, S, hd) inputs; `mask` broadcasts to
    (B', heads, S, L), True = attend. The model's only call of SDPA: sequence parallelism
    wraps or swaps this module (no weights, so state dicts do not change)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the grouping its `mode` names in `ATTENTION_MODES`."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, mode: str):
        super().__init__()
        self.heads, self.head_dim, self.mode = heads, dim // heads, mode
        self.grouping = known(ATTENTION_MODES, mode, "attention mode")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attention = Attention()

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        B, N, D = x.shape
        nt, group = grid[0], self.grouping.group
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).unbind(2)
        # RoPE on the full token order, before regrouping: relative angles are what matter.
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        q, k, v = (group(z, nt).transpose(1, 2) for z in (q, k, v))  # (B', heads, S', hd)
        out = self.attention(q, k, v).transpose(1, 2)  # (B', S', heads, hd)
        out = self.grouping.ungroup(out.reshape(*out.shape[:2], D), B, nt)  # (B, N, D)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; `mask` (B, L) is True where a text token is real."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attention = Attention()

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_norm(self.q(x).reshape(B, N, self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(text).reshape(B, text.shape[1], 2, self.heads, self.head_dim).unbind(2)
        k, v = self.k_norm(k).transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, hd)
        out = self.attention(q, k, v, mask[:, None, None, :])  # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention(s) in `modes`, cross-attention to text (if `cross`), MLP."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, modes: tuple[str, ...], qk_norm: bool,
        cross: bool = True,
    ):
        super().__init__()
        self.attn = nn.ModuleList(SelfAttention(dim, heads, qk_norm, m) for m in modes)
        self.attn_norm = nn.ModuleList(
            nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in modes
        )
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if cross else None
        self.cross_attn = CrossAttention(dim, heads, qk_norm) if cross else None
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        # shift, scale, gate for every self-attention and for the MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * (len(modes) + 1) * dim))

    def forward(self, x, c, text, text_mask, rope, grid, relayout=None) -> torch.Tensor:
        """`relayout(x, mode) -> (x, rope, grid)`, when given, runs before each self-attention:
        sequence parallelism re-shards the residual stream there (and hands back the rope and
        grid of the tokens this rank then holds); every other op here is token-wise."""
        mods = self.adaLN_modulation(c).chunk(3 * (len(self.attn) + 1), dim=1)
        for i, (norm, attn) in enumerate(zip(self.attn_norm, self.attn, strict=True)):
            if relayout is not None:
                x, rope, grid = relayout(x, attn.mode)
            shift, scale, gate = mods[3 * i : 3 * i + 3]
            x = x + gate.unsqueeze(1) * attn(modulate(norm(x), shift, scale), rope, grid)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), text, text_mask)
        shift, scale, gate = mods[-3:]
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.mlp_norm(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        D, patch_dim = config.hidden, math.prod(config.patch) * config.in_channels
        self.x_embedder = nn.Linear(patch_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.fps_embedder = TimestepEmbedder(D)
        self.text_embedder = TextEmbedder(config.text_dim, D)
        self.pooled_embedder = mlp(D, D) if config.pooled_text else None
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.heads, config.mlp_ratio, modes, config.qk_norm, cross)
            for modes, cross in zip(config.block_modes(), config.block_cross_attends(), strict=True)
        )
        self.final_layer = FinalLayer(D, patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for embedder in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # A unit-scale null vector, like a real (normalised) text feature (PixArt).
        nn.init.normal_(self.text_embedder.null, std=self.config.text_dim**-0.5)
        # adaLN-Zero: every residual branch starts closed, so each block starts as the identity
        # and the model as zero. Cross-attention has no gate, so zero its output instead.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents x (B, C, T, H, W) at flow times t (B,) in [0, 1].

        text (B, L, text_dim) with text_mask (B, L) (True = real token) conditions through
        cross-attention; None means unconditional. fps (B,) is added to the timestep
        embedding when given. drop_text (B,) bool swaps those samples' text for the null
        text; when None, training mode drops with p = config.text_dropout.
        """
        tokens, grid = patchify(x, self.config.patch)  # (B, N, pt*ph*pw*C)
        positions = grid.positions(x.device)  # (N, 3)
        h, c, text, text_mask = self.embed(tokens, t, text, text_mask, fps, drop_text,
                                           positions)
        h = self.run_blocks(h, c, text, text_mask, self.rope(positions), grid.shape)  # (B, N, D)
        return unpatchify(self.head(h, c), grid)  # (B, C, T, H, W)

    # `forward` in three steps, which sequence parallelism (actors/workers/sequence_parallel.py)
    # also calls, on its shard of the tokens: `embed` and `head` are per token or per sample,
    # so any shard will do; `run_blocks` takes the shard's rope and grid, and a `relayout` hook.

    def embed(
        self, tokens: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None,
        text_mask: torch.Tensor | None, fps: torch.Tensor | None, drop_text: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens (B, n, P) at grid positions (n, 3) -> the blocks' inputs: tokens h
        (B, n, D) and what every token of a sample sees, adaLN input c (B, D), text (B, L, D)
        and its mask (B, L)."""
        cfg, (B, device) = self.config, (tokens.shape[0], tokens.device)
        # (B, D); the sinusoids are tuned for t in [0, 1000], as in SD3
        c = self.t_embedder(torch.as_tensor(t, device=device).expand(B) * 1000)
        if fps is not None:
            c = c + self.fps_embedder(torch.as_tensor(fps, device=device).expand(B))
        if drop_text is None and self.training and cfg.text_dropout > 0:
            drop_text = torch.rand(B, device=device) < cfg.text_dropout
        text, text_mask = self.text_embedder(text, text_mask, B, drop_text)  # (B, L, D)
        if self.pooled_embedder is not None:  # a dropped sample pools the null text
            weights = text_mask.to(text.dtype)[..., None]  # (B, L, 1)
            pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
            c = c + self.pooled_embedder(pooled)
        h = self.x_embedder(tokens)
        if cfg.pos_embed == "sincos":
            h = h + sincos_3d(positions, cfg.hidden).to(h.dtype)
        return h, c, text, text_mask

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary angles for token positions (N, 3): (N, head_dim // 2, 2)."""
        cfg = self.config
        return rope_freqs(positions, cfg.hidden // cfg.heads, cfg.rope_theta)

    def run_blocks(
        self, h: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        rope: torch.Tensor, grid: tuple[int, int, int], relayout: Callable | None = None,
        blocks: slice | None = None,
    ) -> torch.Tensor:
        """Tokens h (B, n, D) through every block (or the `blocks` slice of them: step caching
        stops after the first); `relayout`: see `DiTBlock.forward`."""
        for block in self.blocks if blocks is None else self.blocks[blocks]:
            h = block(h, c, text, text_mask, rope, grid, relayout=relayout)
        return h

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens h (B, n, D) -> patch values (B, n, pt*ph*pw*C), per token."""
        return self.final_layer(h, c)


#################################################################################
#                                  DiT presets                                  #
#################################################################################
# Widths and depths of DiT / Latte S, B, L, XL; `debug` runs a CPU step in milliseconds.


def dit_debug() -> DiTConfig:
    return DiTConfig(hidden=64, depth=2, heads=4, text_dim=64)


def dit_s() -> DiTConfig:
    return DiTConfig(hidden=384, depth=12, heads=6)


def dit_b() -> DiTConfig:
    return DiTConfig(hidden=768, depth=12, heads=12)


def dit_l() -> DiTConfig:
    return DiTConfig(hidden=1024, depth=24, heads=16)


def dit_xl() -> DiTConfig:
    return DiTConfig(hidden=1152, depth=28, heads=16)


PRESETS = {"debug": dit_debug, "S": dit_s, "B": dit_b, "L": dit_l, "XL": dit_xl}


def dit_config(preset: str = "debug", **overrides) -> DiTConfig:
    """A preset's config with `overrides` (any DiTConfig field) applied and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; known: {sorted(known)}")
    config = replace(PRESETS[preset](), **overrides)
    config.validate()
    return config


def build_dit(preset: str = "debug", layout: str | None = None, **overrides) -> DiT:
    """`build_dit("B", layout="factorized", in_channels=4)` -> DiT."""
    if layout is not None:
        overrides["layout"] = layout
    return DiT(dit_config(preset, **overrides))
