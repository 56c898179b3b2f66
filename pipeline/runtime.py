"""Ray set-up shared by every command: start or join a cluster, and check what it can hold.

Without an address a command starts a local Ray with a bounded object store and no dashboard;
with `--address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets) it joins that cluster.
Every command runs its Ray work inside `ray_session`, which shuts down only a Ray it started.
What the terminal shows of Ray is pipeline/logs.py's business.

The budget checks run before Ray starts where they can (`local_cluster`): a set of actor pools
that takes every CPU of a fixed cluster hangs Ray Data forever, so it is refused up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from actors.common.stage import StageResources
from pipeline.config import ConfigError
from pipeline.logs import divert_native_logs, full_logs, quiet_auth_notice, quiet_worker_logs

# Ray is imported inside the functions that start or query it: the configs here are also read
# by the one-process runner (pipeline/local.py), which runs where Ray is not installed.


@dataclass
class RayConfig:
    num_cpus: int = 0  # local Ray only; 0 = all of this machine's CPUs
    object_store_mb: int = 1024  # local Ray only: bounds memory held by in-flight blocks

    def validate(self) -> None:
        if self.num_cpus < 0 or self.object_store_mb < 100:
            raise ValueError("num_cpus must be >= 0 and object_store_mb >= 100")


def init_ray(address: str | None, cfg: RayConfig) -> bool:
    """Connect to `address` or start a local Ray. Returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    quiet_auth_notice()
    kwargs: dict[str, Any] = {"log_to_driver": True,
                              "logging_config": ray.LoggingConfig(log_level="WARNING")}
    if address or os.environ.get("RAY_ADDRESS"):  # Ray's own variable; `ray job submit` sets it
        ray.init(address=address or None, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False,
                 object_store_memory=cfg.object_store_mb * 2**20, **kwargs)
    quiet_worker_logs()
    divert_native_logs(os.path.join(full_logs(), "driver-native.log"))
    print(f"[ray] {ray.cluster_resources().get('CPU', 0):g} CPUs; full logs in {full_logs()}",
          flush=True)
    return True


@contextmanager
def ray_session(address: str | None, cfg: RayConfig) -> Iterator[bool]:
    """Ray for the length of a command: `init_ray`, then shut down only a Ray this call
    started (a joined cluster, or one a caller already runs, stays up). Yields `started`."""
    import ray

    started = init_ray(address, cfg)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def local_cluster(address: str | None, cfg: RayConfig) -> tuple[float, int] | None:
    """(CPUs, GPUs) of the local Ray a job without an address will start, known before it
    starts, so impossible requests fail before any Ray work; None when joining a cluster."""
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(cfg.num_cpus or os.cpu_count() or 1), gpus


def check_local_budget(stages: dict[str, StageResources], address: str | None,
                       cfg: RayConfig) -> None:
    """`check_budget` against the local Ray a job without an address will start, before it
    starts; nothing when joining a cluster (it may grow)."""
    local = local_cluster(address, cfg)
    if local:
        check_budget(stages, total=local[0], gpus=local[1])


def check_workers(num_workers: int, num_cpus: float, num_gpus: float,
                  cluster: tuple[float, int]) -> None:
    """Refuse more Train workers (or GPUs) than `cluster` (CPUs, GPUs) holds: Ray would wait
    forever."""
    cpus, gpus = cluster
    if num_workers * num_gpus > gpus:
        raise ConfigError(f"num_workers={num_workers} x worker.num_gpus={num_gpus:g} needs "
                          f"{num_workers * num_gpus:g} GPUs but the cluster has {gpus}; lower "
                          "them, or join a cluster with GPUs (--address)")
    if num_workers * num_cpus > cpus:
        raise ConfigError(f"num_workers={num_workers} x worker.num_cpus={num_cpus:g} needs "
                          f"{num_workers * num_cpus:g} CPUs but the cluster has "
                          f"{cpus:g}; lower num_workers or worker.num_cpus")


def check_budget(stages: dict[str, StageResources], reserve_cpus: float = 0.25,
                 total: float | None = None, gpus: int | None = None) -> None:
    """Refuse pools that would take every CPU of a fixed cluster (Ray Data would hang).
    `total`, `gpus`: those of a local Ray not started yet (`local_cluster`); without them the
    running cluster's CPUs (and no GPU check)."""
    if total is None:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
    if gpus is not None:
        for name, s in stages.items():
            if s.num_gpus * s.min_actors > gpus:
                raise ConfigError(f"{name}.num_gpus={s.num_gpus:g} x {s.min_actors} actor(s) "
                                  f"needs GPUs but the cluster has {gpus}; set {name}.num_gpus=0 "
                                  "or join a cluster with GPUs (--address)")
    want = sum(s.num_cpus * s.max_actors for s in stages.values())
    if want > total - reserve_cpus:
        parts = ", ".join(f"{n}: {s.max_actors} x {s.num_cpus}" for n, s in stages.items())
        raise ConfigError(
            f"stage pools ask for {want:g} CPUs ({parts}) but the cluster has {total:g}; "
            f"keep at least {reserve_cpus} CPU free for Ray Data (lower num_cpus or max_actors)"
        )
