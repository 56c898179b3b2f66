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
    """(cos, sin) of the rotation angles for positions (N, 3): float32 (N, head_dim // 2, 2)."""
    angles = []
    for axis, dim in enumerate(rope_dims(head_dim)):
        inv_freq = theta ** (
            -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
        )
        angles.append(positions[:, axis, None].double() * inv_freq)  # (N, dim // 2)
    angle = torch.cat(angles, dim=-1)  # (N, head_dim // 2), float64 until the cos/sin
    return torch.stack((angle.cos(), angle.sin()), dim=-1).float()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, N, heads, head_dim) by `rope_freqs` of its N tokens.

    Eager: one complex multiply (as in Llama / torchtitan), 4x faster forward+backward on CPU
    than the cos/sin form (head_dim 32, N 2048). Under torch.compile: the cos/sin form, which
    Inductor fuses into one kernel (it generates no code for complex ops and falls back).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, N, heads, head_dim // 2, 2)
    f = freqs[:, None]  # (N, 1, head_dim // 2, 2): broadcast over heads
    if torch.compiler.is_compiling():
        x1, x2 = pairs.unbind(-1)
        cos, sin = f.unbind(-1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs.contiguous())
                                 * torch.view_as_complex(f.contiguous()))
    return out.flatten(-2).type_as(x)  # (B, N, heads, head_dim)
