"""VAE loading for the stages that run a VAE (encode, eval, decode).

- `VAEStageConfig` is the `vae:` section of a job config.
- A checkpoint is a `save_vae` safetensors file (ours) or a local diffusers video-VAE folder
  (`AutoencoderKLWan`, `AutoencoderKLCogVideoX`, `AutoencoderKLHunyuanVideo`, read from its
  config.json's `_class_name`; models/vae_adapters.py). Both give the same `VideoAutoencoder`
  interface and latent contract, so every stage takes either.
- `resolve_checkpoint`: a relative path is looked up in the working directory, then in the
  project (so `weights/vae-dc.safetensors` works from anywhere); a folder's config.json is
  checked here, so a wrong folder is refused before a job starts. An `s3://` URI stays a URI
  in the config; every process that loads it uses its node's copy (`local_copy`).
- `load_checkpoint_vae`: file or folder, or one `VAELoadError` line naming it and what to pass
  instead (a missing path, a text file, a truncated file, a DiT export, a non-VAE folder...).
Devices: `models.device.pick_device` ("auto" means CUDA when this process sees a GPU; on the
CPU, torch threads follow the stage's CPU share, so a pool never oversubscribes its node).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from actors.common.storage import StorageError, is_uri, local_copy, locate, resolve, storage_reason
from models.vae import VideoAutoencoder, build_vae, load_vae
from models.vae_adapters import SUPPORTED, find_diffusers_vae, load_diffusers_vae

ROOT = Path(__file__).resolve().parents[2]
WHAT = ("a .safetensors file written by `tubelet train-vae` or a local diffusers video-VAE "
        f"folder ({', '.join(SUPPORTED)})")


class VAELoadError(ValueError):
    """A VAE checkpoint that cannot be used; the message is one line for the user."""


@dataclass
class VAEStageConfig:
    # A save_vae() safetensors file or a diffusers VAE folder; "" = seeded random init (plumbing).
    checkpoint: str = ""
    preset: str = "debug"  # used only without a checkpoint
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tile_px: int = 0  # > 0: tiled encode/decode (bounded memory for large frames)

    def validate(self) -> None:
        if self.tile_px < 0:
            raise ValueError(f"tile_px: must be >= 0 (0 = untiled), got {self.tile_px}")


def _local(path: str) -> str:
    """An object-store checkpoint's local copy on this node (actors/common/storage.py
    `local_copy`: fetched once per node); a local path as it is."""
    if not is_uri(path):
        return path
    try:
        return str(local_copy(resolve(path)))
    except (OSError, StorageError) as e:
        raise VAELoadError(f"VAE checkpoint {path}: {storage_reason(e)}") from None


def resolve_checkpoint(path: str) -> str:
    """An existing checkpoint file's or diffusers VAE folder's absolute path ("" stays ""),
    or its object-store URI (checked there: it exists), or VAELoadError."""
    if not path:
        return ""
    if is_uri(path):
        try:
            store = locate(path, "VAE checkpoint", must_exist=True)
        except StorageError as e:
            raise VAELoadError(str(e)) from None
        if store.is_dir():  # a diffusers VAE folder: its config.json, checked locally
            resolve_checkpoint(_local(store.uri))
        return store.uri
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return str(candidate.resolve())
        if candidate.is_dir():
            try:
                find_diffusers_vae(candidate)
            except (FileNotFoundError, ValueError) as e:
                raise VAELoadError(f"VAE checkpoint {path}: {_first_line(e)}; or pass a "
                                   ".safetensors file written by `tubelet train-vae`") from None
            return str(candidate.resolve())
    raise VAELoadError(f"VAE checkpoint {path} not found (looked in the working directory and "
                       f"in {ROOT}); pass {WHAT}, or vae.checkpoint: '' for a random init")


def vae_normalisation(path: str) -> dict[str, list[float]] | None:
    """{"scaling_factor": [...], "shift_factor": [...]} of a tubelet VAE file (one value or
    one per channel), from its header; None for a diffusers folder, a random init or a file
    that is not ours. What a latent dataset records of the VAE that made it: the file may be
    refitted later (pipeline/latent_stats.py), the latents stay as they were encoded."""
    from models.vae import as_floats, read_vae_config

    if path and is_uri(path):
        path = _local(path)
    if not path or not Path(path).is_file():
        return None
    try:
        config = read_vae_config(path)
    except ValueError:
        return None
    return {"scaling_factor": as_floats(config.scaling_factor),
            "shift_factor": as_floats(config.shift_factor)}


def load_checkpoint_vae(path: str, device: str | torch.device = "cpu") -> VideoAutoencoder:
    """A `save_vae` file or a diffusers VAE folder (looked up as `resolve_checkpoint` does),
    in eval mode."""
    resolved = _local(resolve_checkpoint(path))  # an object store's: this node's copy
    if not resolved:
        raise VAELoadError(f"no VAE checkpoint given; pass {WHAT}")
    if Path(resolved).is_dir():
        try:
            return load_diffusers_vae(resolved, device=device)
        except Exception as e:  # noqa: BLE001 - diffusers missing, weights missing or broken
            raise VAELoadError(f"VAE folder {path} could not be loaded "
                               f"({type(e).__name__}: {_first_line(e)})") from None
    try:
        return load_vae(resolved, device=device)
    except Exception as e:  # noqa: BLE001 - a text file, a truncated file, a DiT export, ...
        raise VAELoadError(f"{path} is not a tubelet VAE checkpoint "
                           f"({type(e).__name__}: {_first_line(e)}); pass {WHAT}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def load_stage_vae(cfg: VAEStageConfig, device: str | torch.device) -> VideoAutoencoder:
    """The config's checkpoint, or (checkpoint "") a seeded random init of its preset."""
    if cfg.checkpoint:
        return load_checkpoint_vae(cfg.checkpoint, device)
    torch.manual_seed(cfg.seed)
    return build_vae(cfg.preset).to(device).eval()
