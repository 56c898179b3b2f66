"""Apply parallelism to a plain `Denoiser` from outside the model (torchtitan's order):
activation checkpointing (`apply_ac`), then `torch.compile` per block, then FSDP2
`fully_shard` on every DiT block and text-encoder block, and finally on the root (embedders,
final layer, the rest). The model file knows none of this.

Per-block sharding is what lets FSDP overlap: while block i computes, block i+1's weights are
all-gathered, and after its forward block i frees them again. Mixed precision is FSDP2's
`MixedPrecisionPolicy`: bf16 weights in forward/backward, fp32 master weights, optimizer
state and gradient reduction. Needs a default process group (gloo on CPU, NCCL on GPU); one
process is fine (a 1-rank group), which is how single-worker runs share this code path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from models.denoiser import Denoiser
from models.device import torch_dtype


@dataclass
class ParallelConfig:
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: mixed precision (GPU)
    activation_checkpointing: bool = False  # recompute each DiT block in backward
    compile: bool = False  # torch.compile each block (GPU; on CPU it needs a C++ toolchain)
    reshard_after_forward: bool = True  # False: keep gathered weights until backward (memory)


def apply_ac(blocks: Iterable[nn.Module]) -> None:
    """Full activation checkpointing (torchtitan's `apply_ac`): each block keeps only its
    inputs in forward and recomputes its activations in backward; memory for compute.

    Wrapped in place (each block's `forward` goes through `checkpoint`) rather than in a
    wrapper module such as `checkpoint_wrapper`, which would add `_checkpoint_wrapped_module.`
    to every parameter name: here names, state dicts, EMA, checkpoints and exports stay those
    of the plain model, and load with or without checkpointing."""
    for block in blocks:
        block.forward = _recomputed(block, block.forward)


def _recomputed(block: nn.Module, forward):
    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():  # nothing to save in eval / no_grad
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def parallelize(model: Denoiser, cfg: ParallelConfig, device: torch.device) -> Denoiser:
    """Shard `model` in place over the default process group and move its shards to `device`."""
    return shard(model, [*model.text.blocks, *model.dit.blocks], model.dit.blocks, cfg, device)


def shard(model: nn.Module, blocks: list[nn.Module], recompute: Iterable[nn.Module],
          cfg: ParallelConfig, device: torch.device, cast_inputs: bool = True) -> nn.Module:
    """The order every model is parallelised in: activation checkpointing and compile of the
    `recompute` blocks, FSDP2 `fully_shard` of each of `blocks`, then of the root `model`.
    `cast_inputs` False: the root's forward gets its inputs as given (a model that keeps
    its timesteps in float32 casts the rest itself: models/finetune.py)."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialised (a 1-rank group "
                           "is fine); the train worker does this")
    recompute = list(recompute)
    if cfg.activation_checkpointing:
        apply_ac(recompute)
    if cfg.compile:
        for block in recompute:
            block.compile()  # in place: parameter names (and checkpoints) unchanged
    # The DiT returns a cropped view (unpatchify); training never edits it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    dtype = torch_dtype(cfg.param_dtype)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # one rank's shard is the whole weight: freeing it after forward saves nothing and
    # gathers it again for backward
    reshard = cfg.reshard_after_forward and dist.get_world_size() > 1
    for block in blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    # The root holds what is left; its weights are needed again at once by backward.
    root = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                cast_forward_inputs=cast_inputs)
    fully_shard(model, mp_policy=root, reshard_after_forward=False)
    return model.to(device)
