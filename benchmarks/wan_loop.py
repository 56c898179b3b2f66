"""Our DiT sampler against diffusers' Wan sampling loop, at equal size.

    python benchmarks/wan_loop.py

`wan_loop_seconds` times the denoising loop of `diffusers.WanPipeline.__call__` (Wan 2.1: one
transformer, CFG as two forwards per step, `uncond + guidance * (cond - uncond)`, then
`scheduler.step`), without its text encoder and VAE: random text embeddings, float32 latents on
CPU, a `FlowMatchEulerDiscreteScheduler`. The `WanTransformer3DModel` is randomly initialised at
our width (heads * head_dim), depth, heads, patch, latent channels, text width and MLP width
(4 * hidden, our mlp_ratio), so both see the same tokens, the same number of steps and
forwards. Run alone, it prints that loop and our `SamplerGroup` (full3d debug DiT export) for
the debug size, and the ratio.

Caveats: the blocks are not the same. Wan has its own FFN (GELU-tanh), 3D rotary embeddings
split unevenly over t/h/w, RMS q/k norms across heads, a cross-attention norm, a 256-wide
timestep embedding, a two-layer text projection and one timestep modulation shared by all
blocks; our DiT has fps conditioning and a text mask (all ones here). Parameter counts are
printed for that reason. Not a test; a shared CPU is noisy.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("benchmarks/wan_loop.py needs diffusers: "
                          "pip install 'diffusers>=0.32' accelerate (or the 'bench' extra)") from e
    return diffusers


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls after one warm-up, in inference mode."""
    with torch.inference_mode():
        run()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wan_loop_seconds(hidden: int, depth: int, heads: int, latent: tuple[int, int, int, int],
                     patch: tuple[int, int, int], text_len: int, text_dim: int, steps: int,
                     guidance: float, repeats: int = 3) -> dict:
    """Seconds per video / per step of WanPipeline's loop (CFG on) for one (C, T, H, W) latent:
    the median of `repeats` runs after one warm-up. Raises ImportError without diffusers."""
    diffusers = _diffusers()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    torch.manual_seed(0)
    channels = latent[0]
    model = WanTransformer3DModel(
        patch_size=tuple(patch), num_attention_heads=heads, attention_head_dim=hidden // heads,
        in_channels=channels, out_channels=channels, text_dim=text_dim, ffn_dim=4 * hidden,
        num_layers=depth,
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    noise = torch.randn(1, *latent)
    prompt_embeds = torch.randn(1, text_len, text_dim)
    negative_prompt_embeds = torch.randn(1, text_len, text_dim)
    dtype = model.dtype

    def run() -> torch.Tensor:
        # WanPipeline.__call__, steps 4 and 6 (boundary_ratio None, expand_timesteps False).
        scheduler.set_timesteps(steps, device="cpu")
        scheduler.set_begin_index(0)
        latents = noise.clone()
        for t in scheduler.timesteps:
            latent_model_input = latents.to(dtype)
            timestep = t.expand(latents.shape[0])
            noise_pred = model(hidden_states=latent_model_input, timestep=timestep,
                               encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            noise_uncond = model(hidden_states=latent_model_input, timestep=timestep,
                                 encoder_hidden_states=negative_prompt_embeds,
                                 return_dict=False)[0]
            noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    seconds = median_seconds(run, repeats)
    return {
        "seconds_per_video": seconds,
        "seconds_per_step": seconds / steps,
        "params": sum(p.numel() for p in model.parameters()),
        "diffusers": diffusers.__version__,
    }


def ours_seconds(latent: tuple[int, int, int, int], text_len: int, text_dim: int, steps: int,
                 guidance: float, repeats: int = 3) -> dict:
    """The same for our SamplerGroup on a debug full3d DiT export (on CPU, one rank)."""
    from actors.workers.sampler import SamplerConfig, SamplerGroup
    from models.export import load_exported
    from tests.exports import write_export

    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(Path(tmp) / "export", layout="full3d", in_channels=latent[0])
        params = sum(p.numel() for p in load_exported(export)[0].parameters())
        group = SamplerGroup(str(export), SamplerConfig(device="cpu"))
        torch.manual_seed(0)
        noise = torch.randn(1, *latent)
        text, mask = torch.randn(1, text_len, text_dim), torch.ones(1, text_len, dtype=torch.bool)
        fps = torch.tensor([8.0])

        def run() -> torch.Tensor:
            return group.sample(noise, text, mask, fps, steps=steps, shift=1.0, guidance=guidance)

        try:
            seconds = median_seconds(run, repeats)
        finally:
            group.close()
    return {"seconds_per_video": seconds, "seconds_per_step": seconds / steps, "params": params}


def main() -> None:
    sys.path.insert(0, str(ROOT))  # run from anywhere
    from models.dit import dit_config

    torch.set_num_threads(1)
    cfg = dit_config("debug")
    latent, text_len, steps, guidance = (16, 3, 16, 16), 64, 10, 4.0
    try:
        theirs = wan_loop_seconds(cfg.hidden, cfg.depth, cfg.heads, latent, cfg.patch, text_len,
                                  cfg.text_dim, steps, guidance)
    except ImportError as e:
        print(f"skipped: {e}")
        return
    ours = ours_seconds(latent, text_len, cfg.text_dim, steps, guidance)
    print(f"debug size (hidden {cfg.hidden}, depth {cfg.depth}, heads {cfg.heads}, patch "
          f"{cfg.patch}), latent {latent}, text {text_len}x{cfg.text_dim}, {steps} steps, "
          f"CFG {guidance}, 1 thread; diffusers {theirs['diffusers']}")
    for name, r in (("ours (SamplerGroup, full3d)", ours), ("diffusers Wan loop", theirs)):
        print(f"  {name:28s} {1e3 * r['seconds_per_step']:7.1f} ms/step  "
              f"{r['seconds_per_video']:6.3f} s/video  {r['params']:,} params")
    ratio = ours["seconds_per_video"] / theirs["seconds_per_video"]
    print(f"  ratio ours / Wan: {ratio:.2f} (< 1: we are faster)")


if __name__ == "__main__":
    main()
