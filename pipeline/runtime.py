"""Ray set-up shared by every job: start or join a cluster, and per-stage resources.

Without an address a job starts a local Ray with a bounded object store and no dashboard; with
`--address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets) it joins that cluster.

The terminal shows progress, not Ray's internals: worker output forwarded to the driver goes
through `quiet_worker_logs`, which drops Ray's own actors (Train controller, placement-group
cleaner, split coordinator, ...) and its C++ / INFO lines, and keeps what our stages and
trainers print (and every Python traceback). Nothing is lost: Ray writes every process's full
log under its session folder (`full_logs()`), printed when a job starts Ray.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

from actors.workers.toolkit import quiet_ray_data_console
from pipeline.config import ConfigError

# Ray is imported inside the functions that start or query it: the configs here are also read
# by the one-process runner (pipeline/local.py), which runs where Ray is not installed.


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
        from ray.data import ActorPoolStrategy

        return dict(
            compute=ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                      max_tasks_in_flight_per_actor=self.max_tasks_in_flight),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            fn_constructor_kwargs=constructor_kwargs,
        )


# Ray's own actors: their forwarded output is Ray's business (it stays in the log files).
RAY_INTERNAL_ACTORS = ("PlacementGroupCleaner", "TrainController", "SplitCoordinator",
                       "DatasetManager", "PreemptionWatcher", "StatsActor", "AutoscalingRequester",
                       "_StatsActor", "AutoscalingCoordinator")
# Lines Ray's libraries print from inside our workers: C++ glog lines ("[2026-12-02 19:57:50,220
# E 3093 3123] core_worker.cc:..."), Ray Train / Data set-up INFO, deprecation notices.
# A C++ glog line: "[2026-12-04 11:41:54,869 E 2816 2816] core_worker.cc:2465: ..."
GLOG = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"
RAY_NOISE = re.compile(
    GLOG + r"|Setting up process group for|"
    r"RayDeprecationWarning|DeprecationWarning|^\s+self\.\w+ = \w+$|Progress bars disabled|"
    r"Starting execution of Dataset|Execution plan of Dataset|execution finished in|"
    r"Registered dataset logger|Full logs are in|Checkpoint successfully created at|"
    r"Reporting training result")


def keep_line(actor: str, line: str) -> bool:
    """Whether a forwarded worker line reaches the terminal."""
    return not any(actor.startswith(a) for a in RAY_INTERNAL_ACTORS) and not RAY_NOISE.search(
        line)


def quiet_worker_logs() -> None:
    """Replace Ray's driver-side printer of worker output with one that drops Ray's noise.

    Uses Ray's (private) stdstream dispatcher; if a Ray release moves it, output stays as Ray
    prints it."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def handler(data: dict) -> None:
        actor = data.get("actor_name") or data.get("task_name") or ""
        lines = [line for line in data.get("lines", []) if keep_line(actor, line)]
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)
    quiet_ray_data_console()  # the driver's Ray Data console lines


class _DropAuthNotice(logging.Filter):
    """Ray's "Token authentication is enabled for this Ray cluster" notice at every local start
    is news only the first time; the README's cluster section explains token auth. The notice
    that auth is *disabled* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


GLOG_LINE = re.compile(GLOG.encode())


def divert_native_logs(path: str, force: bool = False) -> None:
    """Ray's C++ core worker inside this (driver) process logs to file descriptor 2 (e.g. "Actor
    with class name ... has constructor arguments in the object store", once per job). Route
    fd 2 through a filter thread: glog lines are appended to `path` (in Ray's session logs),
    everything else reaches the terminal unchanged. Python's own `sys.stderr` is moved to a
    copy of the real descriptor first, so tracebacks never depend on the thread. Only where
    fd 2 is a terminal (or `force`): piped and captured output (CI, pytest) is left alone."""
    if getattr(divert_native_logs, "installed", False) or not (force or os.isatty(2)):
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except (OSError, ValueError, AttributeError):
        return
    sys.stderr = os.fdopen(os.dup(real), "w", buffering=1, errors="backslashreplace")

    def pump() -> None:
        pending = b""
        with open(read, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if GLOG_LINE.match(line):
                        with open(path, "ab") as log:
                            log.write(line + b"\n")
                    else:
                        os.write(real, line + b"\n")
                if pending and not pending.startswith(b"["):  # a progress bar, a prompt
                    os.write(real, pending)
                    pending = b""
            if pending:
                os.write(real, pending)

    threading.Thread(target=pump, daemon=True, name="tubelet-native-logs").start()
    divert_native_logs.installed = True


def full_logs() -> str:
    """Where Ray keeps every process's complete log for this session."""
    import ray

    try:
        return os.path.join(ray.get_runtime_context().get_node_id() and
                            ray._private.worker._global_node.get_session_dir_path(), "logs")
    except (AttributeError, RuntimeError):
        return "/tmp/ray/session_latest/logs"


def init_ray(address: str | None, cfg: RayConfig) -> bool:
    """Connect to `address` or start a local Ray. Returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropAuthNotice) for f in auth_log.filters):
        auth_log.addFilter(_DropAuthNotice())
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
