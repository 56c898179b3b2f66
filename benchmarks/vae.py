"""VAE throughput: encode and decode frames/s of our causal VAE designs, against each other
and diffusers' Wan VAE.

    python benchmarks/vae.py [--quick] [--threads T] [--frames 17] [--sizes 128 256]
                             [--config configs/train-vae/default.yaml]
                             [--old configs/train-vae/legacy.yaml]

Ours: the model section of --config (the architecture `train-vae` trains: the DC-AE shortcut
design), and "old", the model of --old (the strided-conv design of the first shipped VAE),
both at random init, same run. Baseline, in the same run when diffusers is installed:
`AutoencoderKLWan` (Wan 2.1's architecture, 4x8x8, z_dim 16, random init), at the `base_dim`
whose parameter count is
nearest ours ("equal size"; both counts are printed). Both run through the same
`VideoAutoencoder` contract (models/vae_adapters.py for Wan), float32, batch 1, inference
mode; the time is the median over the repeats after one warm-up. Printed: frames/s and the
ratios ours / old and ours / Wan (> 1: ours is faster). Not part of the test suite; a
shared 2-core box is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from models.vae import VideoVAE  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.train_vae import TrainVAEConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def wan_vae(base_dim: int):
    from diffusers import AutoencoderKLWan

    from models.vae_adapters import DiffusersVideoVAE

    torch.manual_seed(0)
    return DiffusersVideoVAE(AutoencoderKLWan(base_dim=base_dim, z_dim=16))


def params(model) -> int:
    module = model.vae if hasattr(model, "vae") else model
    return sum(p.numel() for p in module.parameters())


def equal_size_wan(target: int):
    """The Wan VAE (base_dim a multiple of 4) whose parameter count is nearest `target`
    (parameters grow ~ base_dim^2: a guess from one probe, then its neighbours)."""
    probe = params(wan_vae(32))
    guess = max(4, round(32 * (target / probe) ** 0.5 / 4) * 4)
    candidates = [wan_vae(d) for d in (guess - 4, guess, guess + 4) if d >= 4]
    return min(candidates, key=lambda m: abs(params(m) - target))


@torch.inference_mode()
def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, frames: int, size: int, repeats: int) -> tuple[float, float]:
    """(encode frames/s, decode frames/s) for one (1, 3, frames, size, size) clip."""
    x = torch.rand(1, 3, frames, size, size) * 2 - 1
    z = model.encode(x)
    enc = time_it(lambda: model.encode(x), repeats)
    dec = time_it(lambda: model.decode(z), repeats)
    return frames / enc, frames / dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "train-vae" / "default.yaml")
    ap.add_argument("--old", type=Path, default=ROOT / "configs" / "train-vae" / "legacy.yaml",
                    help="the design to compare against (its model section)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    ours = VideoVAE(load_config(TrainVAEConfig, args.config).model).eval()
    models = {"ours": ours, "old": VideoVAE(load_config(TrainVAEConfig, args.old).model).eval()}
    try:
        models["wan"] = equal_size_wan(params(ours))
    except ImportError:
        print("diffusers is not installed: no Wan baseline (pip install 'tubelet[bench]')")
    for name, m in models.items():
        desc = (f"base_dim {m.vae.config.base_dim}, z {m.latent_channels}" if name == "wan"
                else f"channels {list(m.config.channels)}, patch {m.config.patch_size}, "
                f"shortcut {m.config.shortcut}, z {m.latent_channels}")
        print(f"{name:>5}: {params(m) / 1e6:.2f}M params ({desc}), "
              f"{m.temporal_factor}x{m.spatial_factor}x{m.spatial_factor}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, batch 1, "
          f"{args.frames} frames, median of {repeats}")
    header = f"{'size':>9} {'model':>5} {'encode f/s':>11} {'decode f/s':>11}"
    print(header)
    results = {}
    for size in args.sizes:
        for name, m in models.items():
            results[name, size] = measure(m, args.frames, size, repeats)
            enc, dec = results[name, size]
            print(f"{size:>4}x{size:<4} {name:>5} {enc:>11.2f} {dec:>11.2f}", flush=True)
        for base in [b for b in ("old", "wan") if b in models]:
            (oe, od), (be, bd) = results["ours", size], results[base, size]
            print(f"{size:>4}x{size:<4} {'ratio':>5} {oe / be:>10.2f}x {od / bd:>10.2f}x"
                  f"   (ours / {base}; > 1 = ours faster)")


if __name__ == "__main__":
    main()
