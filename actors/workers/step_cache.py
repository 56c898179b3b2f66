"""Step caching for the DiT sampler: First Block Cache, applied from outside the model.

Between two sampling steps most of a DiT's output changes little. First Block Cache
(ParaAttention's FBC, built on TeaCache, Liu et al. 2024, arXiv:2411.19108; diffusers ships it
as `FirstBlockCacheConfig`) runs the first block at every step and compares its residual
r1 = block_0(h) - h with the residual of the last step that ran every block:

    change = mean |r1 - r1_prev| / mean |r1_prev|

Below `threshold` the step skips blocks 1..depth-1 and adds the residual they gave last time
(h_out - h_1 of that step) to this step's first-block output; at or above it, every block runs
and both residuals are kept. The first step of a video always runs every block. threshold 0
never skips (a change is never < 0): the same latents as no cache at all, bitwise.

One decision per step for everything the step computes: the conditional and unconditional
branch and every row of a packed batch are summed into one change (as batched CFG does), and on
a sequence- or CFG-parallel group the sums are all-reduced over every rank before the decision,
over real tokens only (not the shards' padding), so every rank takes the same decision and no
collective inside the blocks waits for a rank that skipped. The same sums on one rank and on K
ranks: SP with caching gives what one rank with caching gives.

The blocks run through `ForwardPass` (actors/workers/sequence_parallel.py), the same calls as
`DiT.forward` on one rank and as `SequenceParallel` on several. Diffusers transformers get
diffusers' own hooks instead (actors/workers/pipeline_sampler.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from actors.workers.sequence_parallel import ForwardPass
from models.dit import DiT


@dataclass
class StepCacheConfig:
    """`sampler.cache`: off unless `enabled` (`tubelet generate --cache`)."""

    enabled: bool = False
    # skip a step's blocks 1.. when the first block's residual moved less than this (relative
    # mean absolute change); 0 never skips. 0.1: benchmarks/README.md "Step caching"
    threshold: float = 0.1

    def validate(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"sampler.cache.threshold: must be >= 0, got {self.threshold}")


class StepCache:
    """The residuals of one video (or one packed batch) across its steps; a new one per
    video. `steps` / `skipped` count the decisions."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.first: dict[int, torch.Tensor] = {}  # branch -> r1 of the last full step
        self.rest: dict[int, tuple[torch.Tensor, str]] = {}  # branch -> (h_out - h_1, layout)
        self.steps = self.skipped = 0

    def velocities(self, dit: DiT, group: dist.ProcessGroup | None, x: torch.Tensor,
                   t: torch.Tensor, branches: dict[int, dict]) -> dict[int, torch.Tensor]:
        """The float32 velocity of each of this rank's branches (branch -> the model's keyword
        inputs), its blocks after the first run or skipped by one decision for all ranks."""
        passes = {b: ForwardPass(dit, group, x, t, **kw) for b, kw in branches.items()}
        sums = torch.zeros(2, dtype=torch.float64)  # sum |r1 - r1_prev|, sum |r1_prev|
        firsts = {}
        for b, p in passes.items():
            h0, start = p.h, p.layout
            p.run(slice(0, 1))
            r1 = p.h - p.convert(h0, start, p.layout)
            firsts[b] = (p.h, p.layout, r1)
            if b in self.first:
                real = p.real()
                delta, prev = (r1 - self.first[b]).float(), self.first[b].float()
                if real is not None:  # padding tokens of a shard are not the video's
                    delta, prev = delta[:, real], prev[:, real]
                sums += torch.stack([delta.abs().sum(), prev.abs().sum()]).double().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # every rank of the sampler: one decision
        skip = bool(self.first) and bool(sums[0] < self.threshold * sums[1])
        self.steps += 1
        self.skipped += skip
        out = {}
        for b, p in passes.items():
            h1, layout1, r1 = firsts[b]
            if skip:
                rest, layout = self.rest[b]
                p.move(layout)
                p.h = p.h + rest
            else:
                p.run(slice(1, None))
                self.rest[b] = (p.h - p.convert(h1, layout1, p.layout), p.layout)
                self.first[b] = r1
            out[b] = p.end().float()
        return out
