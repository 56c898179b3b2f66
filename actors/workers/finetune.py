"""The training loop's pretrained trainee (`tubelet train --init FOLDER`): a diffusers
pipeline folder's transformer, fine-tuned in full or with LoRA, in the same loop as the DiT
(actors/workers/train_dit.py `train_loop`: data plan, flow loss, EMA, sharded checkpoints,
exact resume, worker-loss recovery). What differs is this class:

- build: `models.finetune.load_trainable` (float32; LoRA adapters from peft, the rest frozen),
  then FSDP2 `fully_shard` per transformer block and the root (`parallelize.shard`; bf16
  mixed precision when `parallel.param_dtype: bfloat16`, the timestep kept in float32);
- inputs: the caption features `preprocess --model` precomputed (StepBatch.text), padded with
  zeros to the family's text length (Wan: 512) as the pipeline pads its prompts;
- export: a diffusers pipeline folder (full) or diffusers' LoRA file (LoRA), from rank 0.
Frozen weights are not in the optimizer, the EMA or the checkpoints: a LoRA checkpoint holds
the adapters and their optimizer state only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from actors.workers.parallelize import shard
from actors.workers.train_data import Collate, StepBatch
from models.finetune import (
    load_trainable,
    trainable_record,
    write_lora_export,
    write_pipeline_export,
)


class PipelineTrainee:
    """A pipeline folder's transformer as the loop's trainee (DiTTrainee's interface)."""

    def __init__(self, cfg: Any):
        self.cfg, self.tune = cfg, cfg.finetune
        self.record = trainable_record(self.tune.init)
        self.in_channels, self.patch = self.record.latent_channels, self.record.patch
        self.text_dropout = self.tune.text_dropout
        self.text_length, self.text_dim = self.record.family.text_length, self.record.text_dim

    def collate(self) -> Collate:
        return Collate(None, self.text_length)

    def setup(self, device: torch.device) -> None:
        pass  # the text features were computed by preprocess

    def build(self, device: torch.device) -> torch.nn.Module:
        model = load_trainable(self.record, self.tune.lora)
        return shard(model, list(model.blocks), model.blocks, self.cfg.parallel, device,
                     cast_inputs=False)

    def inputs(self, batch: StepBatch) -> dict[str, Any]:
        if batch.text is None:
            raise ValueError("fine-tuning a pipeline needs the caption features of `tubelet "
                             "preprocess --model FOLDER` in the latent dataset")
        return {"text": batch.text, "text_mask": batch.text_mask}

    def empty_batch(self) -> StepBatch:
        return StepBatch(step=-1, bucket="", ids=[""], fps=torch.ones(1),
                         text_ids=torch.zeros(1, 0, dtype=torch.long),
                         text_mask=torch.zeros(1, self.text_length, dtype=torch.bool),
                         x=torch.zeros(1, self.in_channels, *self.patch), weight=torch.zeros(1),
                         slot=[0], text=torch.zeros(1, self.text_length, self.text_dim))

    def export(self, out: Path, ema: Any, model: torch.nn.Module, resolved: dict[str, Any],
               step: int) -> None:
        weights = ema.full_state()  # a collective: every rank
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        if self.tune.lora.rank:
            write_lora_export(out, self.record, model.transformer, weights, step, resolved,
                              self.tune.lora)
        else:
            write_pipeline_export(out, self.record, weights, step, resolved, self.tune.link)
