"""VAE loading and device choice for the stages that run a VAE (encode, eval, later decode).

- `VAEStageConfig` is the `vae:` section of a job config.
- `resolve_checkpoint`: a relative path is looked up in the working directory, then in the
  project (so `weights/vae-default.safetensors` works from anywhere).
- `load_checkpoint_vae`: a `save_vae` file, or one `VAELoadError` line naming the file and what
  to pass instead (a missing path, a text file, a truncated file, a DiT export...).
- `pick_device`: "auto" means CUDA when this process sees a GPU; on the CPU, torch threads
  follow the stage's CPU share (at least 1), so a pool never oversubscribes its node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from models.vae import build_vae, load_vae

ROOT = Path(__file__).resolve().parents[2]


class VAELoadError(ValueError):
    """A VAE checkpoint that cannot be used; the message is one line for the user."""


@dataclass
class VAEStageConfig:
    checkpoint: str = ""  # a save_vae() safetensors file; "" = seeded random init (plumbing)
    preset: str = "debug"  # used only without a checkpoint
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tile_px: int = 0  # > 0: tiled encode/decode (bounded memory for large frames)

    def validate(self) -> None:
        if self.tile_px < 0:
            raise ValueError(f"tile_px: must be >= 0 (0 = untiled), got {self.tile_px}")


def pick_device(device: str, num_cpus: float = 1.0) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a device; on the CPU also set torch's thread count."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(num_cpus)))
    return torch.device(device)


def resolve_checkpoint(path: str) -> str:
    """An existing checkpoint file's absolute path ("" stays ""), or VAELoadError."""
    if not path:
        return ""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return str(candidate.resolve())
    raise VAELoadError(f"VAE checkpoint {path} not found (looked in the working directory and "
                       f"in {ROOT}); pass a .safetensors file written by `tubelet train-vae` "
                       "(RUN/export/vae.safetensors), or vae.checkpoint: '' for a random init")


def load_checkpoint_vae(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A `save_vae` file (looked up as `resolve_checkpoint` does) in eval mode."""
    resolved = resolve_checkpoint(path)
    if not resolved:
        raise VAELoadError("no VAE checkpoint given; pass a .safetensors file written by "
                           "`tubelet train-vae`")
    try:
        return load_vae(resolved, device=device)
    except Exception as e:  # noqa: BLE001 - a text file, a truncated file, a DiT export, ...
        raise VAELoadError(f"{path} is not a tubelet VAE checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0]}); pass a "
                           ".safetensors file written by `tubelet train-vae`") from None


def load_stage_vae(cfg: VAEStageConfig, device: str | torch.device) -> torch.nn.Module:
    """The config's checkpoint, or (checkpoint "") a seeded random init of its preset."""
    if cfg.checkpoint:
        return load_checkpoint_vae(cfg.checkpoint, device)
    torch.manual_seed(cfg.seed)
    return build_vae(cfg.preset).to(device).eval()
