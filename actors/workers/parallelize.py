"""Apply parallelism to a plain `Denoiser` from outside the model (torchtitan's order):
activation checkpointing, then `torch.compile` per block, then FSDP2 `fully_shard` on every
DiT block and text-encoder block, and finally on the root (embedders, final layer, the rest).

Per-block sharding is what lets FSDP overlap: while block i computes, block i+1's weights are
all-gathered, and after its forward block i frees them again. Mixed precision is FSDP2's
`MixedPrecisionPolicy`: bf16 weights in forward/backward, fp32 master weights, optimizer
state and gradient reduction. Needs a default process group (gloo on CPU, NCCL on GPU); one
process is fine (a 1-rank group), which is how single-worker runs share this code path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.denoiser import Denoiser


@dataclass
class ParallelConfig:
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: mixed precision (GPU)
    activation_checkpointing: bool = False  # recompute each DiT block in backward
    compile: bool = False  # torch.compile each block (GPU; on CPU it needs a C++ toolchain)
    reshard_after_forward: bool = True  # False: keep gathered weights until backward (memory)


def parallelize(model: Denoiser, cfg: ParallelConfig, device: torch.device) -> Denoiser:
    """Shard `model` in place over the default process group and move its shards to `device`."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (a 1-rank group "
                           "is fine); the train worker does this")
    # The DiT's own checkpoint switch: one implementation, turned on from outside.
    model.dit.config.grad_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        for block in model.dit.blocks:
            block.compile()  # in place: parameter names (and checkpoints) unchanged
    # The DiT returns a cropped view (unpatchify); training never edits it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.param_dtype),
                              reduce_dtype=torch.float32)
    for block in [*model.text.blocks, *model.dit.blocks]:
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    # The root holds what is left; its weights are needed again at once by backward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model.to(device)
