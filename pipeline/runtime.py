"""Ray set-up shared by every command: start or join a cluster, and leave it as it was.

Without an address a command starts a local Ray with a bounded object store and no dashboard;
with `--address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets) it joins that cluster.
Every command runs its Ray work inside `ray_session`, which shuts down only a Ray it started.
What the terminal shows of Ray is pipeline/logs.py's business.
How big the actor pools may be on the cluster a command runs on is pipeline/pools.py's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
