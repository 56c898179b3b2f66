"""What training keeps: the EMA of the trained module, sharded checkpoints for resume, and the
exported EMA model that `generate` loads (`models.denoiser.load_exported`).

- Checkpoints are torch distributed checkpoints (DCP): every worker writes its own shards, so
  a checkpoint costs no gather and loads back on any number of workers.
- The export is plain: `model.safetensors` (full EMA weights: `dit.*`, and `text.*` for the
  built-in text encoder) plus `config.json` (the DiT config, the text encoder's, and the
  resolved training config) and `train.yaml` (the same training config, loadable with
  `tubelet train --config`). A pretrained text encoder's weights are not copied: its
  `text_encoder` entry is `PretrainedTextEncoder.record()` (folder, model_type, d_model,
  dtype, a sha256 per file), and `load_exported` loads it from that folder after checking.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models.denoiser import EXPORT_FORMAT, Denoiser, FrozenTextSlot
from models.text_encoder import PretrainedTextEncoder


class EMA:
    """Exponential moving average of the parameters, kept in fp32 and sharded like them
    (DTensor shards under FSDP), updated on the local shards only: no communication."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters()}
        self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def update(self) -> None:
        shadow = [self._local(self.shadow[n]) for n in self.params]
        params = [self._local(p.detach()).float() for p in self.params.values()]
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights on CPU (a collective under FSDP: every rank must call it)."""
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
                for n, t in self.shadow.items()}


def _state(model: nn.Module, optim: torch.optim.Optimizer, ema: EMA, train: dict) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd, "ema": ema.shadow, "train": dict(train)}


def save_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer, ema: EMA,
                    train: dict[str, Any], resolved: dict[str, Any]) -> None:
    """Every rank writes its shards under `path` (a folder per rank is fine: DCP names files
    by rank and rank 0 writes the metadata, so the folders merge into one checkpoint). Rank 0
    adds the resolved run config (`config.yaml`, loadable with --config) and `train.json`."""
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(model, optim, ema, train), checkpoint_id=str(path))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (path / "train.json").write_text(json.dumps(train))


def load_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer,
                    ema: EMA) -> dict[str, Any]:
    """Load a `save_checkpoint` folder in place; returns its `train` dict (step, ...)."""
    state = _state(model, optim, ema, {"step": 0, "data_fingerprint": "", "world_size": 0})
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return state["train"]


def export_ema(out: Path, ema: EMA, model: Denoiser, train_config: dict[str, Any],
               step: int, pretrained: PretrainedTextEncoder | None = None) -> Path | None:
    """Write `out/model.safetensors` + `out/config.json` from rank 0 (all ranks must call).
    `pretrained`: the frozen text encoder the model was trained with (outside `model`)."""
    from safetensors.torch import save_file

    weights = ema.full_state()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if (pretrained is not None) != isinstance(model.text, FrozenTextSlot):
        raise ValueError("export_ema: pass the pretrained text encoder exactly when the model "
                         "was built for one")
    text = pretrained.record() if pretrained is not None else asdict(model.text.config)
    config = {"format": EXPORT_FORMAT, "step": step, "dit": asdict(model.dit.config),
              "text_encoder": text, "train": train_config}
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    # JSON turns int mapping keys (bucket frame counts) into strings; the YAML copy is exact
    # and loads back with --config.
    (out / "train.yaml").write_text(yaml.safe_dump(train_config, sort_keys=False))
    return out
