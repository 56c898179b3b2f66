"""Sequence- and CFG-parallel sampling of a diffusers pipeline's transformer (Wan 2.1), applied
from outside the model: its own `forward`, hooks at the points it declares, one processor swap.

Where to split: a diffusers transformer declares it (`_cp_plan`, diffusers' context-parallel
plan). For `WanTransformer3DModel`: the rotary angles (`rope`'s two outputs, dim 1), the stream
entering `blocks.0` (dim 1) and `proj_out`'s output (gathered on dim 1); `""`'s `timestep` is
split only when it has the declared rank (Wan 2.2 TI2V's per-token timesteps; never for 2.1).
`sharded(transformer, group)` installs forward hooks at exactly those points. A split is
tubelet's "tokens" shard (actors/workers/sequence_parallel.py:ShardPlan): rank r holds tokens
[r * n, (r + 1) * n) with n = ceil(N / K), zero tokens padding the last ranks; a gather
all-gathers the shards and cuts the padding off. So N need not divide by K.

Ulysses on SELF-attention only: every `WanAttention` that is not cross-attention gets, for the
duration, `UlyssesWanProcessor`: WanAttnProcessor's own steps (q/k/v projections, RMS norm
across all heads, rotary angles of this rank's tokens), then tubelet's `UlyssesAttention` around
the attention itself (one all-to-all to (heads / K, all N tokens), zero heads and padding tokens
sliced off, SDPA through diffusers' own dispatch, one all-to-all back), then the output
projection. Cross-attention keeps its processor: its queries are this rank's tokens, its keys
the full text. (The attention core is not a module of its own in diffusers, so the processor is
the smallest thing to swap; diffusers' `enable_parallelism` is not used: it needs device meshes,
refuses token counts K does not divide and does not run on CPU.)

CFG parallel (`guided_noise` as `models.wan_pipeline.sample_latents`'s `predict`): with a
`SamplerMesh` of two branches, ranks [0, K) run the prompt, [K, 2K) the negative prompt; rank i
and i + K swap their predictions (one all-gather) and combine them as the pipeline does,
uncond + g * (cond - uncond). Every rank ends a step with the full prediction, so all take the
same scheduler step and stay in lockstep.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from actors.workers.sequence_parallel import SamplerMesh, ShardPlan, UlyssesAttention
from models.wan_pipeline import NoisePredictor, cache_branch


class TokenSplit:
    """One rank's view of the sequence split during a forward: the plan of the N tokens the
    last split point saw (every split point of a forward sees the same N)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.world = group, dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.plan: ShardPlan | None = None

    @property
    def num_tokens(self) -> int:
        if self.plan is None:
            raise RuntimeError("no split point ran before the sharded attention or gather")
        return self.plan.num_tokens

    def split(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence on `dim` -> this rank's n = ceil(N / K) tokens (zeros past N)."""
        N = z.shape[dim]
        if self.plan is None or self.plan.num_tokens != N:
            self.plan = ShardPlan((1, 1, N), self.world)
        return self.plan.shard(z.movedim(dim, 1), "tokens", self.rank).movedim(1, dim)

    def gather(self, z: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's shard on `dim` -> the N real tokens, on every rank."""
        z = z.movedim(dim, 1).contiguous()
        parts = [torch.empty_like(z) for _ in range(self.world)]
        dist.all_gather(parts, z, group=self.group)
        return torch.cat(parts, dim=1)[:, :self.num_tokens].movedim(1, dim)


def _fits(z: Any, spec: Any, where: str) -> bool:
    """Whether a plan entry applies: a tensor of the declared rank (as diffusers' own hook: a
    different rank, or an input not given, is left as it is). Anything else is refused, not
    silently left whole."""
    if z is None:
        return False
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{where}: the context-parallel plan splits a {type(z).__name__}; only "
                        "tensors are supported")
    return spec.expected_dims is None or z.dim() == spec.expected_dims


def _input_hook(tokens: TokenSplit, specs: dict[str, Any], module: nn.Module, where: str):
    """Split the named inputs (passed by keyword or by position) before `module` runs."""
    names = list(inspect.signature(module.forward).parameters)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for name, spec in specs.items():
            if name in kwargs:
                if _fits(kwargs[name], spec, where):
                    kwargs[name] = tokens.split(kwargs[name], spec.split_dim)
            elif (i := names.index(name)) < len(args) and _fits(args[i], spec, where):
                args[i] = tokens.split(args[i], spec.split_dim)
        return tuple(args), kwargs

    return hook


def _output_hook(tokens: TokenSplit, specs: dict[int, Any] | list[Any | None], split: bool,
                 where: str):
    """Split (the plan's `split_output` inputs) or gather (its outputs) `module`'s outputs."""

    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        single = isinstance(output, torch.Tensor)
        out = [output] if single else list(output)
        for i, spec in (specs.items() if isinstance(specs, dict) else enumerate(specs)):
            if spec is not None and _fits(out[i], spec, where):
                out[i] = tokens.split(out[i], spec.split_dim) if split else \
                    tokens.gather(out[i], spec.gather_dim)
        return out[0] if single else type(output)(out)

    return hook


def plan_hooks(model: nn.Module, tokens: TokenSplit) -> list[Any]:
    """Forward (pre-)hooks at each point of `model`'s `_cp_plan`; their handles."""
    plan = getattr(model, "_cp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__} declares no _cp_plan (where its sequence is "
                         "split), so it cannot be sampled sequence-parallel")
    handles = []
    for name, entry in plan.items():
        module, where = model.get_submodule(name), f"{type(model).__name__}.{name or 'forward'}"
        if not isinstance(entry, dict):  # outputs to gather: one spec, or one per output
            specs = list(entry) if isinstance(entry, list | tuple) else [entry]
            handles.append(module.register_forward_hook(_output_hook(tokens, specs, False,
                                                                     where)))
            continue
        inputs = {k: s for k, s in entry.items() if not s.split_output}
        outputs = {k: s for k, s in entry.items() if s.split_output}
        if inputs:
            handles.append(module.register_forward_pre_hook(
                _input_hook(tokens, inputs, module, where), with_kwargs=True))
        if outputs:
            handles.append(module.register_forward_hook(_output_hook(tokens, outputs, True,
                                                                     where)))
    return handles


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding: x (B, n, h, d), cos / sin (1, n, 1, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesWanProcessor:
    """A Wan self-attention with its tokens sharded (see the module docstring)."""

    def __init__(self, inner: Any, tokens: TokenSplit):
        self.inner, self.tokens = inner, tokens  # inner: the processor it stands in for

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Ulysses processor serves self-attention without a mask only")
        q, k, v = _get_qkv_projections(attn, hidden_states, None)  # (B, n, h * d)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMS norm across all heads, per token
        q, k, v = (z.unflatten(2, (attn.heads, -1)) for z in (q, k, v))  # (B, n, h, d)
        if rotary_emb is not None:  # this rank's tokens' angles (rope's output was split)
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        backend = self.inner._attention_backend

        def core(q, k, v, mask=None):  # (B, hp, N, d), all N real tokens of hp heads
            out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=backend)  # (B, N, hp, d)
            return out.transpose(1, 2)

        ulysses = UlyssesAttention(core, self.tokens.group, self.tokens.num_tokens)
        out = ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, n, d)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # (B, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


ULYSSES_PROCESSORS = {"WanAttnProcessor": UlyssesWanProcessor}


def self_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention modules that are not cross-attention (diffusers' AttentionModuleMixin)."""
    return [m for m in model.modules()
            if hasattr(m, "processor") and getattr(m, "is_cross_attention", None) is False]


@contextmanager
def sharded(model: nn.Module, group: dist.ProcessGroup | None) -> Iterator[None]:
    """While inside: `model(...)` (every rank of `group` with the same inputs) is its own forward
    with the tokens split over the group and Ulysses self-attention; every rank gets the full
    output. Everything is undone on exit. A group of one rank (or None) changes nothing."""
    if group is None or dist.get_world_size(group) == 1:
        yield
        return
    tokens = TokenSplit(group)
    attns = self_attentions(model)
    kinds = {type(a.processor).__name__ for a in attns} - set(ULYSSES_PROCESSORS)
    if not attns or kinds:
        raise ValueError(f"{type(model).__name__}: no Ulysses processor for its self-attention "
                         f"({', '.join(sorted(kinds)) or 'none found'}); supported: "
                         f"{', '.join(ULYSSES_PROCESSORS)}")
    before = [a.processor for a in attns]
    handles = plan_hooks(model, tokens)
    try:
        for a, p in zip(attns, before, strict=True):
            a.processor = ULYSSES_PROCESSORS[type(p).__name__](p, tokens)
        yield
    finally:
        for a, p in zip(attns, before, strict=True):
            a.processor = p
        for h in handles:
            h.remove()


def guided_noise(transformer: nn.Module, mesh: SamplerMesh | None) -> NoisePredictor:
    """`sample_latents`'s `predict` for a rank of `mesh`: the pipeline's guided noise, the two
    passes on the two CFG branches when the mesh has them (else one after the other here)."""

    def run(x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
            branch: str) -> torch.Tensor:
        with cache_branch(transformer, branch):
            return transformer(hidden_states=x, timestep=timestep,
                               encoder_hidden_states=embeds, return_dict=False)[0]

    def predict(x: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor,
                negative: torch.Tensor | None, guidance: float) -> torch.Tensor:
        if negative is None:  # no guidance: the conditional pass alone, on every rank
            return run(x, timestep, prompt, "cond")
        if mesh is None or mesh.cfg is None:
            cond, uncond = run(x, timestep, prompt, "cond"), run(x, timestep, negative, "uncond")
        else:
            mine = (run(x, timestep, prompt, "cond") if mesh.branch == 0
                    else run(x, timestep, negative, "uncond"))
            cond, uncond = (torch.empty_like(mine) for _ in range(2))
            dist.all_gather([cond, uncond], mine.contiguous(), group=mesh.cfg)
        return uncond + guidance * (cond - uncond)

    return predict

