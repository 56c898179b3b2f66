"""Natural-texture videos for `tubelet synth --kind photos`: pans, zooms and small rotations
over the photos that ship inside scikit-image's wheel (`skimage/data/`).

Synthetic shapes alone teach a VAE flat colours and sharp edges; users preprocess real
footage. These videos give the VAE (and its evaluation) real textures, fur, faces, text and
noise, with camera-like motion. The photos are split once, by name: `HELD_OUT` never appears
in `--photo-split train` videos, so `eval-vae` on `--photo-split held-out` videos is the
"natural" figure of a VAE trained on the rest.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from actors.common.video import write_mp4

# Natural photos of skimage/data (the synthetic test patterns and masks are left out).
TRAIN = ("astronaut", "camera", "cell", "clock_motion", "coins", "color", "grass", "gravel",
         "hubble_deep_field", "ihc", "moon", "motorcycle_left", "motorcycle_right", "page",
         "retina", "text")
HELD_OUT = ("brick", "chelsea", "coffee", "rocket")
SPLITS = {"train": TRAIN, "held-out": HELD_OUT}


@cache
def load_photo(name: str) -> np.ndarray:
    """skimage/data/<name> as uint8 (H, W, 3) (grey photos repeated to RGB, alpha dropped)."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    paths = [p for p in folder.glob(f"{name}.*") if p.suffix in (".png", ".jpg")]
    if not paths:
        raise FileNotFoundError(f"scikit-image has no photo {name!r} in {folder}; "
                                "reinstall scikit-image (`make setup`)")
    return np.asarray(Image.open(paths[0]).convert("RGB"))


def render_photo_video(width: int, height: int, fps: int, num_frames: int, photo: str,
                       rng: np.random.Generator, out: Path, crf: int, codec: str,
                       preset: str) -> dict[str, Any]:
    """A virtual camera over `photo`: constant pan velocity (bouncing at the photo's
    borders), exponential zoom and a slow rotation, resampled bicubically; returns the row."""
    from PIL import Image

    src = Image.fromarray(load_photo(photo))
    sw, sh = src.size
    half_diag = 0.5 * math.hypot(width, height)  # rotation-safe view radius, output pixels
    fit = half_diag / (0.5 * min(sw, sh))  # the smallest scale whose view fits the photo
    scale = max(fit, 0.4) * float(rng.uniform(1.0, 2.2))  # output pixels per photo pixel
    zoom = float(rng.choice([1.0, rng.uniform(0.8, 1.25)]))  # scale factor per second
    spin = math.radians(float(rng.choice([0.0, rng.uniform(-10, 10)])))  # per second
    angle = math.radians(float(rng.uniform(-5, 5)))
    speed = float(rng.uniform(0.05, 0.5)) * width / scale  # photo pixels per second
    heading = float(rng.uniform(0, 2 * math.pi))
    vx, vy = speed * math.cos(heading) / fps, speed * math.sin(heading) / fps
    cx, cy = float(rng.uniform(0.3, 0.7) * sw), float(rng.uniform(0.3, 0.7) * sh)

    def frames():
        nonlocal cx, cy, vx, vy, scale, angle
        for _ in range(num_frames):
            scale = max(scale, fit * 1.001)
            r = half_diag / scale  # view radius in photo pixels
            if not r <= cx <= sw - r:
                vx, cx = -vx, min(max(cx, r), sw - r)
            if not r <= cy <= sh - r:
                vy, cy = -vy, min(max(cy, r), sh - r)
            # output (u, v) -> photo (x, y) = c + R(angle) ((u, v) - centre) / scale
            ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
            ox, oy = width / 2, height / 2
            coeffs = (ca, -sa, cx - ca * ox + sa * oy, sa, ca, cy - sa * ox - ca * oy)
            yield np.asarray(src.transform((width, height), Image.Transform.AFFINE, coeffs,
                                           resample=Image.Resampling.BICUBIC))
            cx, cy = cx + vx, cy + vy
            scale *= zoom ** (1 / fps)
            angle += spin / fps

    write_mp4(out, frames(), fps, codec=codec, crf=crf, preset=preset, threads=1)
    motion = "zoom" if zoom != 1.0 else "pan"
    return {"caption": f"a {motion} over the {photo.replace('_', ' ')} photo", "photo": photo,
            "motion": motion, "zoom_per_s": round(zoom, 4),
            "spin_deg_per_s": round(math.degrees(spin), 3), "fps": fps,
            "num_frames": num_frames, "width": width, "height": height}
