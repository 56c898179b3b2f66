"""The module training optimises and generation loads: DiT + built-in text encoder.

- `Denoiser`: captions' byte tokens -> text features -> DiT velocity. The DiT and the text
  encoder are trained jointly, so one optimizer, one FSDP root and one state dict cover both.
- `load_exported`: an export folder written by training (`model.safetensors` with `dit.*` and
  `text.*` EMA weights, plus `config.json`) -> the eval-mode modules and their config.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.dit import DiT, DiTConfig
from models.text_encoder import TextEncoder, TextEncoderConfig

EXPORT_FORMAT = "tubelet-dit-v1"


class Denoiser(nn.Module):
    """Captions' byte tokens -> text features -> DiT velocity, as one trainable module."""

    def __init__(self, dit: DiTConfig, text: TextEncoderConfig):
        super().__init__()
        if dit.text_dim != text.dim:
            raise ValueError(f"DiT text_dim ({dit.text_dim}) must equal the text encoder's dim "
                             f"({text.dim})")
        self.dit = DiT(replace(dit))  # copies: the modules own their configs
        self.text = TextEncoder(replace(text))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor, fps: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.text(text_ids, text_mask)  # (B, L, text_dim)
        return self.dit(x, t, text=text, text_mask=text_mask, fps=fps, drop_text=drop_text)


def load_exported(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[DiT, TextEncoder, dict[str, Any]]:
    """An exported model folder (or its model.safetensors) -> (dit, text_encoder, config)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: not an exported model (needs config.json and "
                                "model.safetensors, written by `tubelet train` in RUN/export)")
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_path}: format {config.get('format')!r}, expected "
                         f"{EXPORT_FORMAT!r}")
    # Exports written before activation checkpointing moved out of the model carry its old
    # switch (always false in an export); it is not a model field any more.
    dit_cfg = DiTConfig(**{k: v for k, v in config["dit"].items() if k != "grad_checkpointing"})
    text_cfg = TextEncoderConfig(**config["text_encoder"])
    model = Denoiser(dit_cfg, text_cfg)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model.to(device).eval()
    return model.dit, model.text, config
