"""Wan's own steps, as diffusers' `WanPipeline` takes them (models/pipelines.py reads the
folder and dispatches here; models/cogvideox_pipeline.py is the CogVideoX counterpart):
its prompt cleaning, its per-token timesteps (Wan 2.2 TI2V) and its denoising loop."""

from __future__ import annotations

import html
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor


def prompt_clean(text: str) -> str:
    """WanPipeline's prompt cleaning: ftfy (when installed), HTML entities unescaped twice,
    runs of whitespace to one space, stripped."""
    import regex  # diffusers' own choice: its \\s differs from re's on a few code points

    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def step_timestep(t: Tensor, latents: Tensor, expand_timesteps: bool = False) -> Tensor:
    """The transformer's `timestep` at scheduler time `t`, as WanPipeline builds it: t per
    video (B,), or with expand_timesteps (Wan 2.2 TI2V, text-to-video: its mask over the latent
    grid is all ones) t per token (B, T' * H'/2 * W'/2), float32."""
    if not expand_timesteps:
        return t.expand(latents.shape[0])
    mask = torch.ones(latents.shape[2:], dtype=torch.float32, device=latents.device)
    per_token = (mask[:, ::2, ::2] * t).flatten()  # WanPipeline's mask[0][0][:, ::2, ::2] * t
    return per_token.unsqueeze(0).expand(latents.shape[0], -1)


# (x, timestep, prompt_embeds, negative_embeds or None, guidance_scale) -> the guided noise
NoisePredictor = Callable[[Tensor, Tensor, Tensor, Tensor | None, float], Tensor]


def cache_branch(transformer: torch.nn.Module, name: str) -> AbstractContextManager:
    """Around one denoiser call of a diffusers transformer: `cache_context(name)` ("cond",
    "uncond", or "cond_uncond" for a batched pair, as diffusers' pipelines name them) when a
    cache hook is enabled on it (`enable_cache`: each branch keeps its own cached residuals),
    else nothing."""
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context(name)
    return nullcontext()


@torch.no_grad()
def sample_latents(transformer: torch.nn.Module, scheduler: Any, prompt_embeds: Tensor,
                   negative_embeds: Tensor | None, latents: Tensor, steps: int,
                   guidance_scale: float, predict: NoisePredictor | None = None,
                   expand_timesteps: bool = False) -> Tensor:
    """WanPipeline's denoising loop: `latents` (B, C, T', H', W') noise -> float32 latents in
    the transformer's (normalised) latent space. Text (B, L, D) as `PipelineTextEncoder.encode`
    gives it; guidance (two passes, cond then uncond) only when guidance_scale > 1.
    `scheduler` must be fresh (`new_scheduler`). `predict`, when given, replaces the step's
    noise prediction: predict(x, timestep, prompt_embeds, negative_embeds or None without
    guidance, guidance_scale) -> the guided noise (a sampler running the passes on several
    ranks: actors/workers/pipeline_parallel.py). `expand_timesteps` (the record's: Wan 2.2
    TI2V) gives the transformer one timestep per token (`step_timestep`)."""
    cfg = guidance_scale > 1.0
    if cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (the empty prompt's)")
    # ModelMixin.dtype: the first parameter outside the modules kept in float32
    device, dtype = latents.device, transformer.dtype
    prompt_embeds = prompt_embeds.to(device, dtype)
    negative_embeds = negative_embeds.to(device, dtype) if cfg else None
    latents = latents.float()
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        x, timestep = latents.to(dtype), step_timestep(t, latents, expand_timesteps)
        if predict is not None:
            noise = predict(x, timestep, prompt_embeds, negative_embeds, guidance_scale)
        else:
            with cache_branch(transformer, "cond"):
                noise = transformer(hidden_states=x, timestep=timestep,
                                    encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if cfg:
                with cache_branch(transformer, "uncond"):
                    uncond = transformer(hidden_states=x, timestep=timestep,
                                         encoder_hidden_states=negative_embeds,
                                         return_dict=False)[0]
                noise = uncond + guidance_scale * (noise - uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents.float()
