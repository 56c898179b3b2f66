"""3D rotary position embeddings over integer (t, h, w) token positions.

Each head's channels are split into three groups that rotate with t, h and w respectively
(Wan / HunyuanVideo style). Rotary embeddings depend only on the *difference* of positions in
q.k, so there is no table sized to a training resolution: the same weights run on any
T x H x W grid, any aspect ratio, any frame count. It also means the layouts can share one set
of angles: inside a frame every token has the same t, so the t group cancels in spatial
attention, and likewise h, w cancel in temporal attention.
"""

from __future__ import annotations

import torch


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w): h and w get 2*(head_dim//6) each, t the rest; all even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations e^(i angle) for positions (N, 3): complex64 (N, head_dim // 2)."""
    angles = []
    for axis, dim in enumerate(rope_dims(head_dim)):
        inv_freq = theta ** (
            -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
        )
        angles.append(positions[:, axis, None].double() * inv_freq)  # (N, dim // 2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim // 2), float64 until the cos/sin
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, N, heads, head_dim) by the rotations for its N tokens.

    One complex multiply (as in Llama / torchtitan) instead of the cos/sin form
    (x1 cos - x2 sin, x1 sin + x2 cos): 4x faster forward+backward on CPU at head_dim 32,
    N 2048, same result to 5e-7.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    out = torch.view_as_real(pairs * freqs[:, None])  # (N, 1, hd/2): broadcast over heads
    return out.flatten(-2).type_as(x)  # (B, N, heads, head_dim)
