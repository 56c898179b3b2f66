"""Refit a VAE file's latent normalisation on a latent dataset it made, per channel.

    python -m pipeline.latent_stats --vae VAE --latents PRE/latents --output NEW_VAE
        [--global]

A VAE fitted with one scale for all channels (`train-vae`'s `scaling: global`, or any VAE
exported before per-channel scaling) can leave some channels far quieter than the DiT's unit
noise: the shipped VAE's 16 channels ran from std 0.31 to 4.42 on the demo's training clips.
This reads latents the VAE made (they carry its current normalisation), measures each
channel's mean and std, and writes the same weights with the normalisation that makes those
latents mean 0 / std 1 per channel (or, with --global, over all channels). The dataset itself
is not rewritten: preprocess again with the new file (or transform it: the new latents are
(old - mean_c) / std_c). A DiT trained on the old latents records the old normalisation, and
`tubelet generate` refuses the new file for it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import torch

from models.vae import as_floats, latent_moments, moments_to_stats


def channel_moments(latents: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel sum, sum of squares and count (float64, (C,) each) over every row
    (`models.vae.latent_moments` per row, summed)."""
    total = None
    for batch in pds.dataset(str(latents), format="parquet").to_batches(
            columns=["latent", "latent_shape"], batch_size=64):
        for row in batch.to_pylist():
            z = torch.tensor(row["latent"], dtype=torch.float64).reshape(row["latent_shape"])
            moments = latent_moments(z[None])  # (1, C, T, H, W)
            if total is not None and len(moments[0]) != len(total[0]):
                raise ValueError(f"{latents}: rows with {len(total[0])} and "
                                 f"{len(moments[0])} channels")
            total = moments if total is None else [a + b for a, b in zip(total, moments,
                                                                          strict=True)]
    if total is None:
        raise ValueError(f"{latents}: no latent rows")
    return tuple(total)


def refit(vae_path: str | Path, latents: str | Path, output: str | Path,
          per_channel: bool = True) -> tuple[list[float], list[float]]:
    """Write `output`: the VAE of `vae_path` with the normalisation fitted on `latents`;
    returns the data's (mean, std) per channel, as measured before the refit."""
    from safetensors import safe_open

    from models.vae import load_vae, read_vae_config, save_vae

    config = read_vae_config(vae_path)
    moments = channel_moments(latents)
    channels = len(moments[0])
    if channels != config.latent_channels:
        raise ValueError(f"{latents} has {channels}-channel latents; {vae_path} makes "
                         f"{config.latent_channels}")
    mean, std = (np.broadcast_to(v.numpy(), (channels,))
                 for v in moments_to_stats(*moments, per_channel))
    # stored = (z - shift) * scale; wanted = (stored - mean) / std
    #        = (z - (shift + mean / scale)) * (scale / std)
    scale = np.broadcast_to(np.asarray(as_floats(config.scaling_factor)), mean.shape)
    shift = np.broadcast_to(np.asarray(as_floats(config.shift_factor)), mean.shape)
    new_shift, new_scale = shift + mean / scale, scale / std
    # one pair only where it stays one pair: a per-channel source composes to per-channel
    single = not per_channel and not isinstance(config.scaling_factor, tuple) \
        and not isinstance(config.shift_factor, tuple)
    pick = (lambda v: float(v[0])) if single else (lambda v: tuple(float(x) for x in v))
    with safe_open(str(vae_path), framework="pt") as f:  # load_vae casts to float32
        dtype = f.get_tensor(next(iter(f.keys()))).dtype  # the file's own: kept
    model = load_vae(vae_path)
    model.config = replace(model.config, shift_factor=pick(new_shift),
                           scaling_factor=pick(new_scale))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_vae(model.to(dtype), output)
    return mean.tolist(), std.tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.latent_stats",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--vae", required=True, help="the VAE file that made the latents")
    ap.add_argument("--latents", required=True, help="a latent dataset (preprocess output)")
    ap.add_argument("--output", required=True, help="the refitted VAE file to write")
    ap.add_argument("--global", dest="per_channel", action="store_false",
                    help="one mean and std over all channels (a per-channel VAE stays per "
                    "channel: its channels' scales already differ)")
    args = ap.parse_args(argv)
    try:
        mean, std = refit(args.vae, args.latents, args.output, args.per_channel)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", flush=True)
        return 2
    print(f"[latent-stats] per channel before: std {', '.join(f'{s:.2f}' for s in std)}; "
          f"mean {', '.join(f'{m:.2f}' for m in mean)}")
    print(f"[latent-stats] wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
