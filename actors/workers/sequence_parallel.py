"""Sequence- and CFG-parallel DiT forward for sampling: one video's tokens split over K ranks.

Applied from outside the model (torchtitan / xDiT style): `models/dit.py` knows no process
groups; this module calls the model's own `embed`, `run_blocks` and `head` on a sharded token
stream, swapping self-attention's `Attention` for Ulysses where needed. Each attention mode
shards by its `unit` in `models.dit.ATTENTION_MODES`. Two schemes, chosen by the layout's modes:

- full3d: DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509). Each rank holds a
  contiguous chunk of the N tokens. Around every self-attention one all-to-all turns
  (all heads, N/K tokens) into (heads/K, all N tokens) -- q, k and v in one call -- SDPA runs
  on whole sequences, and one all-to-all turns the output back.
- spatial, temporal, factorized, interleaved: DSP, Dynamic Sequence Parallelism (Zhao et al.
  2024, arXiv:2403.10266). Spatial attention is per frame, so with the frames sharded it needs
  no communication; temporal attention is per h*w position, so with the positions sharded
  neither does it. Only when consecutive attentions need different dims does ONE all-to-all of
  the residual stream (B, N/K, D) switch the sharded dim (`DiTBlock`'s `relayout` hook):
  factorized pays two per block, interleaved one, spatial and temporal none at all.

Everything else (qkv, q/k norms, RoPE, adaLN, cross-attention to the full text, MLP) is
token-wise and runs on whatever shard a rank holds.

Padding instead of refusal: a dim that K does not divide is padded at its end with zero tokens,
and only along the sharded dim, so padded frames (or positions) form attention problems of
their own that no real token sees; Ulysses slices the padding off the gathered sequence before
SDPA. A head count that K does not divide gets zero heads, sliced off afterwards. Odd grids
(3 x 5 x 7 tokens on 2 ranks, or a rank holding only padding) need no special case.

Every rank ends with the full velocity (B, C, T, H, W) (an all-gather), so all ranks take the
same Euler step on the same full latent and stay in lockstep with no other communication.

CFG parallel (`cfg_velocity` with a `SamplerMesh` of two branches): the conditional branch
runs on ranks [0, K), the unconditional one (null text, or a negative prompt) on [K, 2K); rank
i and i + K swap their velocities (one all-gather of two) and combine them as
v_uncond + g * (v_cond - v_uncond). Inference only: the collectives here carry no gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.dit import ATTENTION_MODES, DiT, known
from models.patching import patchify, unpatchify

# A shard layout is the `unit` of the attention mode it serves: "tokens" = contiguous chunks of
# the t-major token order (full attention, Ulysses), "frames" = whole frames (DSP, spatial),
# "positions" = whole h*w positions over all frames (DSP, temporal).
SHARD_LAYOUTS = tuple(mode.unit for mode in ATTENTION_MODES.values())


def shard_layout(mode: str) -> str:
    """The shard layout attention `mode` needs; a ValueError names an unknown mode."""
    return known(ATTENTION_MODES, mode, "attention mode").unit


@dataclass(frozen=True)
class ShardPlan:
    """Which tokens each of `world` ranks holds in each layout, for one (nt, nh, nw) grid.

    Pure index arithmetic (no communication). Local token order: "tokens" keeps the global
    order; "frames" holds (frames_per_rank, S) and "positions" (nt, positions_per_rank), both
    t-major, which is the order an attention mode's `group` expects of that many frames.
    """

    grid: tuple[int, int, int]
    world: int

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def positions(self) -> int:  # S = nh * nw
        return self.grid[1] * self.grid[2]

    @property
    def frames_per_rank(self) -> int:
        return math.ceil(self.grid[0] / self.world)

    @property
    def positions_per_rank(self) -> int:
        return math.ceil(self.positions / self.world)

    def index(self, layout: str, rank: int, device=None) -> torch.Tensor:
        """Global token index of each local token of `rank` (n_local,); -1 marks padding."""
        nt, S, N = self.grid[0], self.positions, self.num_tokens
        if layout == "tokens":
            n = math.ceil(N / self.world)
            g = torch.arange(rank * n, (rank + 1) * n, device=device)
            return torch.where(g < N, g, -1)
        if layout == "frames":
            a = self.frames_per_rank
            f = torch.arange(rank * a, (rank + 1) * a, device=device)[:, None]  # (a, 1)
            idx = f * S + torch.arange(S, device=device)[None]  # (a, S)
            return torch.where(f < nt, idx, -1).flatten()
        if layout == "positions":
            b = self.positions_per_rank
            p = torch.arange(rank * b, (rank + 1) * b, device=device)[None]  # (1, b)
            idx = torch.arange(nt, device=device)[:, None] * S + p  # (nt, b)
            return torch.where(p < S, idx, -1).flatten()
        raise ValueError(f"unknown layout {layout!r}; one of {SHARD_LAYOUTS}")

    def local_grid(self, layout: str) -> tuple[int, int, int]:
        """The grid self-attention sees on a shard (its grouping reads the frame count)."""
        if layout == "frames":
            return (self.frames_per_rank, self.grid[1], self.grid[2])
        if layout == "positions":
            return (self.grid[0], self.positions_per_rank, 1)
        return (1, 1, math.ceil(self.num_tokens / self.world))  # full attention: no grouping

    def shard(self, z: torch.Tensor, layout: str, rank: int) -> torch.Tensor:
        """Full tokens z (B, N, ...) -> this rank's (B, n_local, ...), padding = zeros."""
        idx = self.index(layout, rank, z.device)
        z = torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)  # index N = the zero token
        return z[:, torch.where(idx < 0, self.num_tokens, idx)]


def _all_to_all(send: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """send (K, ...): chunk j goes to rank j; returns (K, ...): chunk i came from rank i."""
    send = send.contiguous()  # first: empty_like would copy a permuted tensor's strides
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


class _Stream:
    """One rank's shard of the residual stream during one forward: which layout it is in,
    and how it switches (one all-to-all) or gathers (one all-gather)."""

    def __init__(self, plan: ShardPlan, group: dist.ProcessGroup | None, rank: int,
                 layout: str, rope: torch.Tensor):
        self.plan, self.group, self.rank, self.layout = plan, group, rank, layout
        self.ropes = {}  # per layout: this rank's rotary angles (padding gets token 0's)
        for name in SHARD_LAYOUTS:
            self.ropes[name] = rope[plan.index(name, rank, rope.device).clamp(min=0)]

    def relayout(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """`DiTBlock`'s hook: x in the layout `mode` needs, with that layout's rope and grid."""
        target = shard_layout(mode)
        x, self.layout = self.switch(x, self.layout, target), target
        return x, self.ropes[target], self.plan.local_grid(target)

    def switch(self, x: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """A shard x of this rank in layout `source` -> in layout `target` (one all-to-all when
        they differ; `self.layout` is the caller's to update)."""
        if source == target:
            return x
        if {source, target} != {"frames", "positions"}:
            raise ValueError(f"no switch from {source} to {target} (full attention is never "
                             "mixed with spatial / temporal in one model)")
        return self._frames_to_positions(x) if target == "positions" else \
            self._positions_to_frames(x)

    def _frames_to_positions(self, x: torch.Tensor) -> torch.Tensor:
        p, K = self.plan, self.plan.world
        (nt, _, _), S, a, b = p.grid, p.positions, p.frames_per_rank, p.positions_per_rank
        B, _, D = x.shape
        x = F.pad(x.reshape(B, a, S, D), (0, 0, 0, K * b - S))  # (B, a, K*b, D)
        send = x.reshape(B, a, K, b, D).permute(2, 0, 1, 3, 4)  # (K, B, a, b, D)
        recv = _all_to_all(send, self.group)  # (K, B, a, b, D): frame block i from rank i
        x = recv.permute(1, 0, 2, 3, 4).reshape(B, K * a, b, D)[:, :nt]  # (B, nt, b, D)
        return x.reshape(B, nt * b, D)

    def _positions_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        p, K = self.plan, self.plan.world
        (nt, _, _), S, a, b = p.grid, p.positions, p.frames_per_rank, p.positions_per_rank
        B, _, D = x.shape
        x = F.pad(x.reshape(B, nt, b, D), (0, 0, 0, 0, 0, K * a - nt))  # (B, K*a, b, D)
        send = x.reshape(B, K, a, b, D).permute(1, 0, 2, 3, 4)  # (K, B, a, b, D)
        recv = _all_to_all(send, self.group)  # (K, B, a, b, D): position block i from rank i
        x = recv.permute(1, 2, 0, 3, 4).reshape(B, a, K * b, D)[:, :, :S]  # (B, a, S, D)
        return x.reshape(B, a * S, D)

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        """Every rank's shard (B, n_local, P) -> the full tokens (B, N, P) on every rank."""
        parts = [torch.empty_like(z) for _ in range(self.plan.world)]
        dist.all_gather(parts, z.contiguous(), group=self.group)
        idx = torch.cat([self.plan.index(self.layout, r, z.device)
                         for r in range(self.plan.world)])
        keep = idx >= 0
        out = z.new_empty(z.shape[0], self.plan.num_tokens, z.shape[2])
        out[:, idx[keep]] = torch.cat(parts, dim=1)[:, keep]
        return out


class UlyssesAttention(nn.Module):
    """Stands in for a self-attention's `Attention` while a sharded forward runs: tokens
    sharded -> heads sharded (one all-to-all for q, k, v), SDPA on all `num_tokens` real
    tokens, and back (one all-to-all). No weights: the state dict does not change."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None, num_tokens: int):
        super().__init__()
        self.inner, self.group, self.num_tokens = inner, group, num_tokens

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        K, N = dist.get_world_size(self.group), self.num_tokens
        B, h, n, d = q.shape  # this rank's n tokens, all heads
        hp = math.ceil(h / K)  # heads per rank; zero heads pad h up to K * hp
        qkv = F.pad(torch.stack([q, k, v]), (0, 0, 0, 0, 0, K * hp - h))  # (3, B, K*hp, n, d)
        send = qkv.reshape(3, B, K, hp, n, d).permute(2, 0, 1, 3, 4, 5)  # (K, 3, B, hp, n, d)
        recv = _all_to_all(send, self.group)  # (K, 3, B, hp, n, d): token chunk i
        q, k, v = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, B, hp, K * n, d)[:, :, :, :N].unbind(0)
        out = F.pad(self.inner(q, k, v, mask), (0, 0, 0, K * n - N))  # (B, hp, K*n, d)
        send = out.reshape(B, hp, K, n, d).permute(2, 0, 1, 3, 4)  # (K, B, hp, n, d)
        recv = _all_to_all(send, self.group)  # (K, B, hp, n, d): head chunk i
        return recv.permute(1, 0, 2, 3, 4).reshape(B, K * hp, n, d)[:, :h]  # (B, h, n, d)


@contextmanager
def _ulysses(dit: DiT, group: dist.ProcessGroup | None, num_tokens: int) -> Iterator[None]:
    """Swap every self-attention's `Attention` for Ulysses for the duration (cross-attention
    stays local: its queries are this rank's tokens, its keys the full text)."""
    attns = [attn for block in dit.blocks for attn in block.attn]
    inner = [attn.attention for attn in attns]
    try:
        for attn, a in zip(attns, inner, strict=True):
            attn.attention = UlyssesAttention(a, group, num_tokens)
        yield
    finally:
        for attn, a in zip(attns, inner, strict=True):
            attn.attention = a


class ForwardPass:
    """One DiT forward taken block by block, on one rank (`group` None: the calls of
    `DiT.forward`, bitwise) or on this rank's shard of a sequence-parallel group: the
    constructor embeds, `run(blocks)` runs some of the blocks, `end()` gives the full velocity
    on every rank.
    Step caching (actors/workers/step_cache.py) stops between blocks; `SequenceParallel` runs
    them all at once. The residual stream `h` is in layout `layout` ("tokens" on one rank)."""

    def __init__(self, dit: DiT, group: dist.ProcessGroup | None, x: torch.Tensor,
                 t: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                 fps: torch.Tensor | None, drop_text: torch.Tensor | None):
        self.dit, self.group = dit, group
        tokens, self.grid = patchify(x, dit.config.patch)  # (B, N, P): a reshape, every rank
        positions = self.grid.positions(x.device)  # (N, 3)
        self.stream = self.plan = None
        if group is None:
            self.rope = dit.rope(positions)
            self.h, self.c, self.text, self.text_mask = dit.embed(
                tokens, t, text, text_mask, fps, drop_text, positions)
            return
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        layouts = [shard_layout(mode) for block in dit.config.block_modes() for mode in block]
        if "tokens" in layouts and set(layouts) != {"tokens"}:  # Ulysses and DSP do not mix
            raise ValueError("sequence parallelism needs full attention alone or spatial / "
                             f"temporal alone, got block modes {dit.config.block_modes()}")
        first = layouts[0]
        self.plan = ShardPlan(self.grid.shape, world)
        self.stream = _Stream(self.plan, group, rank, first, dit.rope(positions))
        self.h, self.c, self.text, self.text_mask = dit.embed(
            self.plan.shard(tokens, first, rank), t, text, text_mask, fps, drop_text,
            self.plan.shard(positions[None], first, rank)[0])  # h (B, n_local, D)

    @property
    def layout(self) -> str:
        return "tokens" if self.stream is None else self.stream.layout

    def run(self, blocks: slice | None = None) -> None:
        """The DiT's blocks (all, or a slice of them) on the residual stream."""
        dit, stream = self.dit, self.stream
        if stream is None:
            self.h = dit.run_blocks(self.h, self.c, self.text, self.text_mask, self.rope,
                                    self.grid.shape, blocks=blocks)
            return
        ulysses = stream.layout == "tokens"  # relayout hands each attention its rope and grid
        swap = _ulysses(dit, self.group, self.plan.num_tokens) if ulysses else nullcontext()
        with swap:
            self.h = dit.run_blocks(self.h, self.c, self.text, self.text_mask,
                                    stream.ropes[stream.layout],
                                    self.plan.local_grid(stream.layout),
                                    relayout=stream.relayout, blocks=blocks)

    def convert(self, x: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """A stream tensor x of this rank in layout `source` -> in layout `target` (one
        all-to-all when they differ; the stream's own layout is unchanged)."""
        return x if self.stream is None else self.stream.switch(x, source, target)

    def move(self, target: str) -> None:
        """The residual stream into layout `target`."""
        self.h = self.convert(self.h, self.layout, target)
        if self.stream is not None:
            self.stream.layout = target

    def real(self) -> torch.Tensor | None:
        """Which of this rank's tokens (in the current layout) are real, not padding; None on
        one rank (all are)."""
        if self.stream is None:
            return None
        return self.plan.index(self.stream.layout, self.stream.rank, self.h.device) >= 0

    def end(self) -> torch.Tensor:
        """The velocity (B, C, T, H, W), full on every rank."""
        out = self.dit.head(self.h, self.c)
        if self.stream is not None:
            out = self.stream.gather(out)
        return unpatchify(out, self.grid)


class SequenceParallel:
    """`SequenceParallel(dit, group)(x, t, text=..., ...)`: the DiT's own call, with each
    video's tokens split over the ranks of `group` (None = the default group). Every rank
    passes the same inputs and gets the full velocity back, so `models.flow.sample` and
    `models.flow.guided_velocity` take it as the model. A 1-rank group is the plain model."""

    def __init__(self, dit: DiT, group: dist.ProcessGroup | None = None):
        self.dit, self.group = dit, group
        self.world = dist.get_world_size(group)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                 drop_text: torch.Tensor | None = None) -> torch.Tensor:
        dit = self.dit
        if self.world == 1:
            return dit(x, t, text=text, text_mask=text_mask, fps=fps, drop_text=drop_text)
        group = self.group if self.group is not None else dist.group.WORLD
        p = ForwardPass(dit, group, x, t, text, text_mask, fps, drop_text)
        p.run()
        return p.end()


# ---------------------------------------------------------------------------------------------
# CFG parallel


@dataclass
class SamplerMesh:
    """The groups of a sampler of K * (2 if CFG parallel else 1) ranks: rank = branch * K + i.

    `sp` is this rank's K sequence-parallel ranks (None when K = 1); `cfg` pairs rank i with
    rank i + K of the other branch (None without CFG parallel); `branch` 0 runs the text,
    1 the null text or negative prompt."""

    sp: dist.ProcessGroup | None
    cfg: dist.ProcessGroup | None
    branch: int

    @classmethod
    def build(cls, sequence_parallel: int, cfg_parallel: bool) -> SamplerMesh:
        """From the default group, whose size must be K * (2 if cfg_parallel else 1). Every
        rank must call it (group creation is collective, in the same order everywhere)."""
        K, branches = sequence_parallel, 2 if cfg_parallel else 1
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != K * branches:
            raise ValueError(f"world size {world} != sequence_parallel {K} x {branches} "
                             "CFG branch(es)")
        sp_groups = [dist.new_group(list(range(b * K, (b + 1) * K))) for b in range(branches)]
        cfg_groups = [dist.new_group([i, i + K]) for i in range(K)] if cfg_parallel else []
        branch = rank // K
        return cls(sp=sp_groups[branch] if K > 1 else None,
                   cfg=cfg_groups[rank % K] if cfg_parallel else None, branch=branch)


def cfg_velocity(dit: DiT, x: torch.Tensor, t: torch.Tensor, guidance: float,
                 text: torch.Tensor | None, text_mask: torch.Tensor | None = None,
                 fps: torch.Tensor | None = None, neg_text: torch.Tensor | None = None,
                 neg_mask: torch.Tensor | None = None, mesh: SamplerMesh | None = None,
                 cache: Any = None) -> torch.Tensor:
    """CFG velocity v_uncond + guidance * (v_cond - v_uncond), in float32.

    The unconditional branch is the negative prompt (neg_text, neg_mask) when given, else the
    null text (drop_text=True, as `models.flow.guided_velocity`). The branches run one after
    the other here, or on two halves of the mesh; sequence-parallel when mesh.sp is set.
    guidance == 1 runs the conditional branch only (every rank, so none waits). With a
    `cache` (a `StepCache`, actors/workers/step_cache.py, which imports this module) the
    step may skip the blocks after the first."""
    sp = mesh.sp if mesh is not None else None
    B = x.shape[0]

    def inputs(b: int) -> dict:
        if b == 0:
            return dict(text=text, text_mask=text_mask, fps=fps, drop_text=None)
        if neg_text is not None:
            return dict(text=neg_text, text_mask=neg_mask, fps=fps, drop_text=None)
        return dict(text=text, text_mask=text_mask, fps=fps,
                    drop_text=torch.ones(B, dtype=torch.bool, device=x.device))

    split = mesh is not None and mesh.cfg is not None
    mine = [0] if guidance == 1.0 else [mesh.branch] if split else [0, 1]
    if cache is not None:
        v = cache.velocities(dit, sp, x, t, {b: inputs(b) for b in mine})
    else:
        model = SequenceParallel(dit, sp) if sp is not None else dit
        v = {b: model(x, t, **inputs(b)).float() for b in mine}
    if guidance == 1.0:
        return v[0]
    if not split:
        v_cond, v_uncond = v[0], v[1]
    else:
        own = v[mesh.branch]
        v_cond, v_uncond = (torch.empty_like(own) for _ in range(2))
        dist.all_gather([v_cond, v_uncond], own.contiguous(), group=mesh.cfg)
    return v_uncond + guidance * (v_cond - v_uncond)
