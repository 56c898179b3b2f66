"""3D patching: latents (B, C, T, H, W) <-> tubelet tokens (B, N, pt*ph*pw*C).

A tubelet is a pt x ph x pw block of latent cells; it becomes one token. Tokens are ordered
row-major over the patch grid (t, then h, then w), so token n sits at grid cell
(n // (nh*nw), (n // nw) % nh, n % nw) and `PatchGrid.positions()` gives exactly that.

Sizes that are not multiples of the patch: `patchify` zero-pads each of T, H, W at the end
(last frames, bottom rows, right columns) up to the next multiple, and `unpatchify` crops back
to the size recorded in the grid. Padded cells are model outputs that are thrown away, so a
loss computed on the unpatchified prediction never sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Patch = tuple[int, int, int]


@dataclass(frozen=True)
class PatchGrid:
    """Where the tokens of one batch came from: the latent size and the patch that cut it."""

    size: tuple[int, int, int]  # latent (T, H, W) before padding
    patch: Patch  # (pt, ph, pw)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Tokens along (t, h, w): ceil(size / patch)."""
        return tuple(math.ceil(s / p) for s, p in zip(self.size, self.patch, strict=True))

    @property
    def num_tokens(self) -> int:
        nt, nh, nw = self.shape
        return nt * nh * nw

    @property
    def tokens_per_frame(self) -> int:
        return self.shape[1] * self.shape[2]

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Integer (t, h, w) grid position of every token, in token order: (N, 3) int64."""
        nt, nh, nw = self.shape
        axes = [torch.arange(n, device=device) for n in (nt, nh, nw)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)


def check_patch(patch: Patch) -> Patch:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch must be three positive ints (pt, ph, pw), got {patch}")
    return patch


def patchify(x: torch.Tensor, patch: Patch) -> tuple[torch.Tensor, PatchGrid]:
    """Cut latents (B, C, T, H, W) into tokens (B, N, pt*ph*pw*C) plus their grid."""
    if x.ndim != 5:
        raise ValueError(f"patchify expects latents (B, C, T, H, W), got shape {tuple(x.shape)}")
    pt, ph, pw = check_patch(patch)
    B, C, T, H, W = x.shape
    grid = PatchGrid(size=(T, H, W), patch=(pt, ph, pw))
    nt, nh, nw = grid.shape
    pad = (0, nw * pw - W, 0, nh * ph - H, 0, nt * pt - T)  # F.pad wants last dim first
    if any(pad):
        x = F.pad(x, pad)
    x = x.reshape(B, C, nt, pt, nh, ph, nw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, nt, nh, nw, pt, ph, pw, C)
    return x.reshape(B, nt * nh * nw, pt * ph * pw * C), grid  # (B, N, P)


def unpatchify(tokens: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Inverse of `patchify`: tokens (B, N, pt*ph*pw*C) -> latents (B, C, T, H, W), cropped."""
    pt, ph, pw = grid.patch
    nt, nh, nw = grid.shape
    B, N, P = tokens.shape
    if N != grid.num_tokens or P % (pt * ph * pw):
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not fit grid {grid.shape} with patch {grid.patch}"
        )
    C = P // (pt * ph * pw)
    x = tokens.reshape(B, nt, nh, nw, pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, nt, pt, nh, ph, nw, pw)
    x = x.reshape(B, C, nt * pt, nh * ph, nw * pw)  # (B, C, T', H', W') padded
    T, H, W = grid.size
    return x[:, :, :T, :H, :W]
