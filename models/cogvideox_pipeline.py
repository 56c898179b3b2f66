"""CogVideoXPipeline's own pieces (CogVideoX 2B / 5B text-to-video), as models/pipelines.py's
second family: the rotary embeddings the pipeline computes per video size, and its denoising
loop, step for step (diffusers' pipelines/cogvideo/pipeline_cogvideox.py).

What differs from Wan, and where it is handled:
- text: T5, 226 tokens, no prompt cleaning, no attention mask: every one of the 226 rows
  (padding included) is the encoder's output and the transformer attends to all of them
  (models/pipelines.py `PipelineTextEncoder` with `masked=False`);
- latents: the pipeline's layout is (B, F, C, H, W); tubelet keeps (B, C, T', H', W') at the
  seam, so `sample_cogvideox` permutes in and out (the noise is drawn in the pipeline's layout:
  models/pipelines.py `initial_noise`);
- the latents are returned as the pipeline leaves them (scaled: the VAE adapter divides by
  vae.config.scaling_factor before decoding, as the pipeline's decode_latents does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.wan_pipeline import cache_branch

MAX_SEQUENCE_LENGTH = 226  # CogVideoXPipeline.__call__'s default


def rotary_embeddings(config: dict[str, Any], latent_frames: int, latent_height: int,
                      latent_width: int, device: str | torch.device = "cpu"
                      ) -> tuple[Tensor, Tensor] | None:
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for latents of (T', H', W')
    (`config`: the transformer's), or None when it uses none (CogVideoX 2B)."""
    if not config.get("use_rotary_positional_embeddings"):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = int(config.get("patch_size") or 2), config.get("patch_size_t")
    grid = (latent_height // p, latent_width // p)
    base_h, base_w = int(config["sample_height"]) // p, int(config["sample_width"]) // p
    dim = int(config["attention_head_dim"])
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=dim, crops_coords=None, grid_size=grid,
        temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
        max_size=(base_h, base_w), device=device,
    )  # fmt: skip


@torch.no_grad()
def sample_cogvideox(transformer: torch.nn.Module, scheduler: Any, prompt_embeds: Tensor,
                     negative_embeds: Tensor | None, latents: Tensor, steps: int,
                     guidance_scale: float, generator: torch.Generator | None = None) -> Tensor:
    """CogVideoXPipeline's denoising loop (use_dynamic_cfg off, its default): `latents`
    (B, C, T', H', W') noise -> float32 (B, C, T', H', W') latents. Guidance only when
    guidance_scale > 1, as the pipeline runs it: one batch [uncond, cond]. `generator` is the
    pipeline's after drawing the noise (CogVideoXDPMScheduler draws from it at every step;
    models/pipelines.py `step_generator`)."""
    cfg = guidance_scale > 1.0
    if cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (the empty prompt's)")
    device, dtype = latents.device, transformer.dtype
    text = prompt_embeds.to(device, dtype)
    if cfg:
        text = torch.cat([negative_embeds.to(device, dtype), text])
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    x = latents.permute(0, 2, 1, 3, 4).to(dtype) * scheduler.init_noise_sigma  # (B, F, C, H, W)
    rotary = rotary_embeddings(dict(transformer.config), x.shape[1], x.shape[3], x.shape[4],
                               device)
    dpm = type(scheduler).__name__ == "CogVideoXDPMScheduler"
    old_pred = None
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([x] * 2) if cfg else x, t)
        with cache_branch(transformer, "cond_uncond"):
            noise = transformer(hidden_states=model_input, encoder_hidden_states=text,
                                timestep=t.expand(model_input.shape[0]),
                                image_rotary_emb=rotary, return_dict=False)[0].float()
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        if dpm:
            x, old_pred = scheduler.step(noise, old_pred, t, timesteps[i - 1] if i > 0 else None,
                                         x, eta=0.0, generator=generator, return_dict=False)
        else:
            x = scheduler.step(noise, t, x, eta=0.0, generator=generator, return_dict=False)[0]
        x = x.to(dtype)
    return x.permute(0, 2, 1, 3, 4).float()  # (B, C, T', H', W')
