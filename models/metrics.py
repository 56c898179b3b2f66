"""Image and video quality metrics, defined once: PSNR and SSIM.

Definitions (what `tubelet eval-vae` and the VAE trainer report):
- PSNR: 10 log10(peak^2 / MSE). On [0, 1] pixels peak = 1; on the models' [-1, 1] pixels the
  peak-to-peak range is 2 (`psnr` takes tensors in [-1, 1]).
- SSIM of an image (Wang et al. 2004): an 11-tap gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, computed on each channel over the 'valid' window positions (no padding, as
  scikit-image does with gaussian_weights=True) and averaged over channels and positions.
- A clip (uint8, as it would be written to an mp4): PSNR of the MSE over all its frames,
  pixels and RGB channels on [0, 1]; SSIM the mean of its per-frame SSIMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    """PSNR in dB of an MSE measured on pixels whose range is `peak` (1 on [0, 1], 2 on
    [-1, 1])."""
    return 10 * math.log10(peak**2 / max(mse, 1e-12))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB between videos in [-1, 1]; `y` (the reconstruction) is clamped first."""
    return psnr_from_mse(F.mse_loss(y.clamp(-1, 1).float(), x.float()).item(), peak=2.0)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) images in [0, data_range] -> (N,), mean over C and the
    valid window positions. H and W must be >= 11."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = gaussian_window().to(x.device)
    gx = g.view(1, 1, 1, -1).expand(C, 1, 1, -1)  # (C, 1, 1, 11): separable, per channel
    gy = g.view(1, 1, -1, 1).expand(C, 1, -1, 1)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(v, gx, groups=C), gy, groups=C)  # (N, C, H-10, W-10)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
         / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))  # (N, C, H-10, W-10)
    return s.mean(dim=(1, 2, 3))  # (N,)


def clip_metrics(original: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """uint8 (T, H, W, 3) clips -> {"mse", "psnr", "ssim"} on [0, 1] (module docstring)."""
    a = original.permute(0, 3, 1, 2).double() / 255  # (T, 3, H, W)
    b = recon.permute(0, 3, 1, 2).double() / 255
    mse = float((a - b).square().mean())
    return {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": float(ssim(a, b).mean())}
