"""Fine-tuning a pretrained diffusers video transformer (`tubelet train --init FOLDER`): its
settings, the module the training loop optimises, and the two exports.

- `FinetuneConfig` (the `finetune:` section of a train config): the pipeline folder, LoRA or
  full, the flow shift and caption dropout.
- `FlowTransformer`: the folder's transformer under the DiT's calling convention
  (x_t, t in [0, 1], text features) -> velocity, so the loop's flow loss, EMA and
  checkpoints are the DiT's. Wan is trained as it samples: its scheduler moves along
  sigma = t with the transformer given timestep = t * num_train_timesteps (1000) and predicting
  noise - x0 (`flow_prediction`), which is exactly `models.flow`'s rectified flow.
- `load_trainable`: the transformer in float32 (FSDP2 shards one dtype per group; a bf16 load
  keeps some modules in fp32), all weights trained, or peft LoRA adapters on the attention
  projections with everything else frozen.
- Exports: a full fine-tune is a diffusers pipeline folder (`write_pipeline_export`: the
  trained transformer, the other components linked or copied from the base); LoRA is
  diffusers' LoRA file (`write_lora_export`: `get_peft_model_state_dict` keys, saved with
  `save_lora_weights` and its adapter metadata) plus `tubelet_lora.json` naming the base, which
  models/pipelines.py reads back as the base pipeline with the adapter applied.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.pipelines import (
    LORA_RECORD,
    PipelineError,
    PipelineRecord,
    base_digest,
    load_transformer,
    read_pipeline,
)

FULL_RECORD = "tubelet_finetune.json"  # beside model_index.json in a full fine-tune's export
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class LoraConfig:
    rank: int = 0  # 0: full fine-tuning; >= 1: LoRA adapters of this rank (`train --lora R`)
    alpha: float = 0.0  # LoRA scale alpha / rank; 0 = rank (scale 1)
    # modules (name suffixes, as peft matches them) that get adapters: Wan's attention
    # projections, self- and cross-attention
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0

    def validate(self) -> None:
        if self.rank < 0 or self.alpha < 0 or not 0 <= self.dropout < 1 or not self.targets:
            raise ValueError("lora: rank and alpha must be >= 0, dropout in [0, 1), targets "
                             "not empty")


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a train config; `init` empty = train tubelet's own DiT."""

    init: str = ""  # a diffusers pipeline folder (WanPipeline): its transformer is trained
    lora: LoraConfig = field(default_factory=LoraConfig)
    shift: float = 0.0  # training times' flow shift; 0 = the folder scheduler's (flow_)shift
    text_dropout: float = 0.0  # a caption's features zeroed with this probability
    link: bool = True  # the full export links the base's other components (False: copies)

    def validate(self) -> None:
        if self.shift < 0 or not 0 <= self.text_dropout < 1:
            raise ValueError("finetune: shift must be >= 0 and text_dropout in [0, 1)")


def trainable_record(folder: str | Path) -> PipelineRecord:
    """The pipeline folder to fine-tune, or one PipelineError line: not a pipeline folder (no
    transformer, ...), a family we do not train, or a LoRA export (fine-tune its base)."""
    record = read_pipeline(folder)
    if record.lora is not None:
        raise PipelineError(f"{folder}: a LoRA export; pass its base pipeline folder "
                            f"({record.folder}) to --init")
    if record.pipeline != "WanPipeline":
        raise PipelineError(f"{folder}: fine-tuning supports WanPipeline folders (Wan 2.1, "
                            f"Wan 2.2 TI2V), not {record.pipeline}")
    return record


def scheduler_shift(record: PipelineRecord) -> float:
    """The flow shift the folder's scheduler samples with (UniPC `flow_shift`, FlowMatch
    Euler `shift`); training times are shifted the same way."""
    config = record.configs["scheduler"]
    return float(config.get("flow_shift") or config.get("shift") or 1.0)


def num_train_timesteps(record: PipelineRecord) -> int:
    return int(record.configs["scheduler"].get("num_train_timesteps") or 1000)


class FlowTransformer(nn.Module):
    """A diffusers video transformer as a velocity model: (x_t (B, C, T, H, W), t (B,) in
    [0, 1], text (B, L, D)) -> the predicted noise - x0, float, x's shape."""

    def __init__(self, transformer: nn.Module, timesteps: int = 1000,
                 expand_timesteps: bool = False):
        super().__init__()
        self.transformer = transformer
        self.timesteps, self.expand_timesteps = timesteps, expand_timesteps

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """`text_mask` and `fps` are not inputs of the pipeline's transformer (Wan attends to
        all its text rows, zeros included); `drop_text` (B,) zeroes those rows' features."""
        if drop_text is not None:
            text = torch.where(drop_text[:, None, None], torch.zeros_like(text), text)
        # the timestep stays float32 (bf16 would round t * 1000 by up to 4)
        timestep = t.float() * self.timesteps
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per token
            pt, ph, pw = self.transformer.config.patch_size
            tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
            timestep = timestep[:, None].expand(-1, tokens)
        dtype = self.transformer.patch_embedding.weight.dtype  # bf16 under mixed precision
        return self.transformer(hidden_states=x.to(dtype), timestep=timestep,
                                encoder_hidden_states=text.to(dtype), return_dict=False)[0]


def load_trainable(record: PipelineRecord, lora: LoraConfig) -> FlowTransformer:
    """The folder's transformer in float32 on the CPU, in train mode: every weight trainable,
    or (lora.rank >= 1) peft LoRA adapters on `lora.targets` and the rest frozen. The
    adapters' A matrices draw from torch's global generator (the trainer seeds it)."""
    transformer = load_transformer(record, "cpu", torch.float32).train()
    if lora.rank:
        from peft import LoraConfig as PeftLoraConfig

        transformer.add_adapter(PeftLoraConfig(
            r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
            target_modules=list(lora.targets), init_lora_weights=True))
        for name, param in transformer.named_parameters():
            param.requires_grad_("lora_" in name)
        if not any(p.requires_grad for p in transformer.parameters()):
            raise PipelineError(f"{record.folder}: no module matches lora.targets "
                                f"{list(lora.targets)}")
    else:
        transformer.requires_grad_(True)
    return FlowTransformer(transformer, num_train_timesteps(record), record.expand_timesteps)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder (a reader sees the old or the new export)."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _fresh(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_pipeline_export(out: Path, record: PipelineRecord, weights: dict[str, torch.Tensor],
                          step: int, train: dict[str, Any], link: bool = True) -> Path:
    """A full fine-tune's export: a diffusers pipeline folder at `out` whose transformer holds
    `weights` (FlowTransformer names: `transformer.*`) and whose other components are the
    base's, linked file by file (`link`) or copied. Loads with `WanPipeline.from_pretrained`."""
    from safetensors.torch import save_file

    tmp = _fresh(out)
    for component in record.components:
        if component == "transformer":
            continue
        for src in sorted(p for p in record.path(component).rglob("*") if p.is_file()):
            dst = tmp / component / src.relative_to(record.path(component))
            dst.parent.mkdir(parents=True, exist_ok=True)
            if link:
                dst.symlink_to(src.resolve())
            else:
                shutil.copy2(src, dst)
    (tmp / "transformer").mkdir()
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in weights.items()}
    save_file(state, str(tmp / "transformer" / TRANSFORMER_WEIGHTS), metadata={"format": "pt"})
    shutil.copy2(record.path("transformer") / "config.json", tmp / "transformer" / "config.json")
    shutil.copy2(record.folder / "model_index.json", tmp / "model_index.json")
    (tmp / FULL_RECORD).write_text(json.dumps(
        {"format": "tubelet-finetune-v1", "kind": "full", "base": str(record.folder),
         "base_digest": base_digest(record), "step": step, "train": train},
        indent=2, default=str))
    _swap_in(tmp, out)
    return out


def write_lora_export(out: Path, record: PipelineRecord, transformer: nn.Module,
                      weights: dict[str, torch.Tensor], step: int, train: dict[str, Any],
                      lora: LoraConfig) -> Path:
    """A LoRA fine-tune's export at `out`: `pytorch_lora_weights.safetensors` in diffusers'
    LoRA format (the adapter `weights`, FlowTransformer names, turned into peft's saved keys by
    `get_peft_model_state_dict` of `transformer`, which holds the adapter config, and written
    by the pipeline class's `save_lora_weights` with the adapter's metadata: rank, alpha,
    targets), and `tubelet_lora.json` (the base folder and its digest). Loads with
    `pipe.load_lora_weights(out)` on the base pipeline, and in `tubelet generate`."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    tmp = _fresh(out)
    state = {k.removeprefix("transformer."): v for k, v in weights.items()}
    layers = get_peft_model_state_dict(transformer, state_dict=state, adapter_name="default")
    metadata = transformer.peft_config["default"].to_dict()
    getattr(diffusers, record.pipeline).save_lora_weights(
        tmp, transformer_lora_layers=layers, safe_serialization=True,
        transformer_lora_adapter_metadata=metadata)
    (tmp / LORA_RECORD).write_text(json.dumps(
        {"format": "tubelet-lora-v1", "base": str(record.folder),
         "base_digest": base_digest(record), "rank": lora.rank,
         "alpha": lora.alpha or lora.rank, "targets": list(lora.targets), "step": step,
         "train": train}, indent=2, default=str))
    _swap_in(tmp, out)
    return out
