"""The module training optimises and generation loads: DiT + text encoder.

- `Denoiser`: captions' tokens -> text features -> DiT velocity. With the built-in encoder the
  DiT and the text encoder are trained jointly, so one optimizer, one FSDP root and one state
  dict cover both. With a pretrained encoder (`TextEncoderConfig.pretrained`) the module holds
  the DiT only: the frozen encoder runs outside it and its features come in as `text`, so it
  is not optimised, not in the EMA, checkpoints or exported weights, and not sharded (frozen,
  it needs no gradients or optimizer state; each worker keeps a copy in the compute dtype).
Its exported weights (`dit.*`, `text.*`) and config are models/export.py's format.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from models.dit import DiT, DiTConfig
from models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    text_width,
)


class FrozenTextSlot(nn.Module):
    """The text slot of a Denoiser whose encoder is pretrained: nothing trains here. `blocks`
    is empty, so `parallelize` (which shards each text-encoder block) shards nothing."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()

    def forward(self, *_) -> torch.Tensor:
        raise TypeError("this Denoiser's text encoder is pretrained and frozen: pass its "
                        "features as text=, not text_ids")


class Denoiser(nn.Module):
    """Captions' tokens (or a frozen encoder's features) -> DiT velocity, as one module."""

    def __init__(self, dit: DiTConfig, text: TextEncoderConfig):
        super().__init__()
        width = text_width(text)
        if dit.text_dim != width:
            what = (f"the width (d_model) of the pretrained text encoder {text.pretrained}"
                    if text.pretrained else "the text encoder's dim")
            raise ValueError(f"DiT text_dim ({dit.text_dim}) must equal {what} ({width})")
        self.dit = DiT(replace(dit))  # copies: the modules own their configs
        self.text = FrozenTextSlot() if text.pretrained else TextEncoder(replace(text))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_ids: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        """`text_ids` (B, L) for the built-in encoder, or `text` (B, L, text_dim): a frozen
        pretrained encoder's features; `text_mask` (B, L) True on real tokens, for both."""
        if text is None:
            text = self.text(text_ids, text_mask)  # (B, L, text_dim)
        return self.dit(x, t, text=text, text_mask=text_mask, fps=fps, drop_text=drop_text)
