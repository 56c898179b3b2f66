"""The module training optimises and generation loads: DiT + text encoder.

- `Denoiser`: captions' tokens -> text features -> DiT velocity. With the built-in encoder the
  DiT and the text encoder are trained jointly, so one optimizer, one FSDP root and one state
  dict cover both. With a pretrained encoder (`TextEncoderConfig.pretrained`) the module holds
  the DiT only: the frozen encoder runs outside it and its features come in as `text`, so it
  is not optimised, not in the EMA, checkpoints or exported weights, and not sharded (frozen,
  it needs no gradients or optimizer state; each worker keeps a copy in the compute dtype).
- `load_exported`: an export folder written by training (`model.safetensors` with `dit.*` and,
  for the built-in encoder, `text.*` EMA weights, plus `config.json`) -> the eval-mode DiT,
  the text encoder (a pretrained one loaded from the folder its record names, checked
  against its file digests) and the config.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.dit import DiT, DiTConfig
from models.text_encoder import (
    PretrainedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    load_recorded,
    text_width,
)

EXPORT_FORMAT = "tubelet-dit-v1"


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


def load_exported(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[DiT, TextEncoder | PretrainedTextEncoder, dict[str, Any]]:
    """An exported model folder (or its model.safetensors) -> (dit, text_encoder, config).
    Both encoders have `encode(captions, device) -> (features (B, L, text_dim), mask (B, L))`."""
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
    record = config["text_encoder"]
    pretrained = None
    if record.get("pretrained"):  # older exports have no such key: the built-in encoder
        pretrained = load_recorded(record)  # checks the folder is the one training used
        text_cfg = TextEncoderConfig(max_len=record["max_len"], pretrained=record["pretrained"])
    else:
        text_cfg = TextEncoderConfig(**record)
    model = Denoiser(dit_cfg, text_cfg)
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    model.to(device).eval()
    encoder = model.text if pretrained is None else pretrained.to(device)
    return model.dit, encoder, config
