"""Gloo process groups for unit tests: `spawn(cases, world, folder)` runs `cases(world, rank)`
on `world` processes joined in one gloo group (through a file store in `folder`) and returns
rank 0's results (a dict of floats, loaded with weights_only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Cases = Callable[[int, int], dict[str, float]]  # (world, rank) -> results; module-level


def _worker(rank: int, world: int, folder: str, cases: Cases) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        results = cases(world, rank)
        if rank == 0:
            torch.save(results, f"{folder}/results.pt")
    finally:
        dist.destroy_process_group()


def spawn(cases: Cases, world: int, folder: Path) -> dict[str, float]:
    mp.spawn(_worker, args=(world, str(folder), cases), nprocs=world, join=True)
    return torch.load(folder / "results.pt", weights_only=True)
