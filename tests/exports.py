"""Small models on disk for generation tests: a debug DiT export written by the real export
code (actors/workers/checkpoints.py:export_ema) and a debug VAE checkpoint (save_vae)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from actors.workers.checkpoints import EMA, export_ema
from models.denoiser import Denoiser
from models.dit import dit_config
from models.flow import FlowConfig
from models.text_encoder import text_encoder_debug
from models.vae import build_vae, save_vae


def write_export(out: Path, layout: str = "full3d", in_channels: int = 4, seed: int = 0,
                 scale: float = 0.05, latents: dict | None = None, **dit) -> Path:
    """A debug Denoiser with every parameter nudged off its adaLN-Zero init (so the velocity
    is not zero), exported as `tubelet train` does; `latents`: the training config's record of
    the VAE that made its latents (actors.workers.train_dit.LatentsRecord as a dict)."""
    torch.manual_seed(seed)
    model = Denoiser(dit_config("debug", layout=layout, in_channels=in_channels, **dit),
                     text_encoder_debug())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    train = {"flow": asdict(FlowConfig()), "seed": seed}
    if latents:
        train["latents"] = latents
    export_ema(Path(out), EMA(model, 0.0), model, train, step=0)
    return Path(out)


def write_vae(path: Path, seed: int = 0, **scaling) -> Path:
    """The debug VAE (4 latent channels, 4x8x8) at a seeded random init; `scaling`:
    scaling_factor / shift_factor overrides (floats or one per channel)."""
    torch.manual_seed(seed)
    save_vae(build_vae("debug", **scaling), path)
    return path
