"""What a DiT's training latents hold (docs/demo-model.md): per-channel statistics, what each
channel carries when decoded, and how many clips turn back inside the clip.

    python benchmarks/demo_data.py --latents PRE/latents --vae VAE [--videos VIDEOS]
        [--decode-clips 6]

- per-channel mean and std of the latents (as the DiT sees them);
- PSNR of decoding a latent with one channel set to its mean (0 after normalisation), and
  with only the loudest channels kept, against decoding the full latent (`--decode-clips`
  clips; what each channel draws);
- with `--videos` (the synth folder the latents came from, its captions.jsonl): the clips
  whose shape reverses direction between their first and last frame (bounces), whose later
  frames contradict the caption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import torch

from models.vae import load_vae, moments_to_stats
from pipeline.latent_stats import channel_moments


def psnr(err: float) -> float:
    return 10 * np.log10(4.0 / max(err, 1e-12))  # pixels in [-1, 1]


def channel_decodes(latents: str, vae_path: str, clips: int) -> None:
    vae = load_vae(vae_path)
    rows = pds.dataset(latents).head(clips, columns=["latent", "latent_shape"]).to_pylist()
    zs = [torch.tensor(np.asarray(r["latent"], np.float32).reshape(r["latent_shape"]))[None]
          for r in rows]
    C = zs[0].shape[1]

    def mse(keep: list[int]) -> float:
        err = 0.0
        with torch.no_grad():
            for z in zs:
                part = torch.zeros_like(z)
                part[:, keep] = z[:, keep]
                err += (vae.decode(part) - vae.decode(z)).pow(2).mean().item() / len(zs)
        return err

    drop = {c: psnr(mse([k for k in range(C) if k != c])) for c in range(C)}
    print("PSNR (dB) with one channel set to its mean, vs the full latent: "
          + ", ".join(f"{c}: {v:.1f}" for c, v in drop.items()))
    order = sorted(drop, key=drop.get)  # the channels whose loss hurts most first
    for n in (1, 2, 5, 8):
        print(f"only channels {order[:n]}: {psnr(mse(order[:n])):.1f} dB")


def turning_back(latents: str, videos: Path) -> tuple[int, int]:
    """(clips whose shape reverses along x or y inside the clip, clips)."""
    caps = {}
    for line in (videos / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        caps[row["path"]] = row
    table = pds.dataset(latents).to_table(columns=["path", "num_frames", "start"]).to_pylist()
    flips = 0
    for r in table:
        c = caps[Path(r["path"]).name]
        fps, seconds = c["fps"], (r["num_frames"] - 1) / 8.0  # clips at the bucket's 8 fps
        a = int(round(r["start"] * fps))
        b = min(int(round((r["start"] + seconds) * fps)), len(c["bboxes"]) - 1)
        box = np.asarray(c["bboxes"][a:b + 1], float)
        steps = np.diff((box[:, :2] + box[:, 2:]) / 2, axis=0)  # (T-1, 2) centre moves
        flips += bool(((steps > 0.5).any(0) & (steps < -0.5).any(0)).any())
    return flips, len(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", required=True)
    ap.add_argument("--vae", required=True, help="the VAE that made the latents")
    ap.add_argument("--videos", type=Path, default=None)
    ap.add_argument("--decode-clips", type=int, default=6)
    args = ap.parse_args()
    mean, std = (v.numpy() for v in moments_to_stats(*channel_moments(args.latents), True))
    share = std**2 / (std**2).sum()
    print("per channel std: " + ", ".join(f"{v:.2f}" for v in std))
    print("per channel mean: " + ", ".join(f"{v:.2f}" for v in mean))
    print(f"loudest channel {int(share.argmax())}: {share.max():.0%} of the variance")
    channel_decodes(args.latents, args.vae, args.decode_clips)
    if args.videos:
        flips, n = turning_back(args.latents, args.videos)
        print(f"{flips} of {n} clips turn back inside the clip ({flips / n:.0%})")


if __name__ == "__main__":
    main()
