"""Ray set-up shared by every job: start or join a cluster, and per-stage resources.

Without an address a job starts a local Ray with a bounded object store and no dashboard; with
`--address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets) it joins that cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from pipeline.config import ConfigError


@dataclass
class RayConfig:
    num_cpus: int = 0  # local Ray only; 0 = all of this machine's CPUs
    object_store_mb: int = 1024  # local Ray only: bounds memory held by in-flight blocks

    def validate(self) -> None:
        if self.num_cpus < 0 or self.object_store_mb < 100:
            raise ValueError("num_cpus must be >= 0 and object_store_mb >= 100")


@dataclass
class StageResources:
    """How one stage runs: an actor pool of min..max actors, each with these resources.

    On a 2-core machine the pools together must leave CPU for Ray Data's own tasks: a pool
    that takes every CPU hangs the job, so shares are fractional by default.
    """

    num_cpus: float = 0.25
    num_gpus: float = 0.0
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = 8
    # Batches queued per actor. 1 spreads work over the whole pool as soon as one actor is
    # busy (Ray Data would otherwise queue blocks on the actor next to them).
    max_tasks_in_flight: int = 2

    def validate(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus: must be >= 0")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}, "
                             f"{self.max_actors}")
        if self.max_tasks_in_flight < 1:
            raise ValueError(f"max_tasks_in_flight: must be >= 1, got {self.max_tasks_in_flight}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def map_batches_kwargs(self, **constructor_kwargs: Any) -> dict[str, Any]:
        return dict(
            compute=ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                      max_tasks_in_flight_per_actor=self.max_tasks_in_flight),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs=constructor_kwargs,
        )


def init_ray(address: str | None, cfg: RayConfig) -> bool:
    """Connect to `address` or start a local Ray. Returns True if this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):  # Ray's own variable; `ray job submit` sets it
        ray.init(address=address or None, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False,
                 object_store_memory=cfg.object_store_mb * 2**20, **kwargs)
    return True


def check_budget(stages: dict[str, StageResources], reserve_cpus: float = 0.25) -> None:
    """Refuse pools that would take every CPU of a fixed cluster (Ray Data would hang)."""
    total = ray.cluster_resources().get("CPU", 0.0)
    want = sum(s.num_cpus * s.max_actors for s in stages.values())
    if want > total - reserve_cpus:
        parts = ", ".join(f"{n}: {s.max_actors} x {s.num_cpus}" for n, s in stages.items())
        raise ConfigError(
            f"stage pools ask for {want:g} CPUs ({parts}) but the cluster has {total:g}; "
            f"keep at least {reserve_cpus} CPU free for Ray Data (lower num_cpus or max_actors)"
        )
