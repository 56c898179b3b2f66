"""Ray Train plumbing both trainers (`train`, `train-vae`) use.

- `ClusterConfig`: the fields of a Ray Train job (workers, their resources, restarts, kept
  checkpoints, local Ray) and their checks, shared by `TrainConfig` and `TrainVAEConfig`.
- `torch_trainer` + `fit`: the TorchTrainer (checkpoints in RUN/checkpoints) and its run;
  a run that used up its restarts is `TrainFailed` (exit 1).
- run folders: `prepare_run` (refuse an occupied RUN, clear a failed start), `commit_log` /
  `committed_step` (RUN/checkpoints/latest.json: where a restarted stream begins).
- Ray Data set-up for training input: `keep_order`, `no_progress_bars`, `stream_split_config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.common.storage import StorageConfig, Store, as_store
from pipeline.config import UsageError, writable_dir
from pipeline.runtime import RayConfig


class TrainError(UsageError):
    """A run that cannot start as asked (bad data, occupied output); one line for the user."""


class TrainFailed(RuntimeError):
    """Workers failed more often than `max_failures` allows."""


@dataclass
class WorkerResources:
    num_cpus: float = 0.5  # per Ray Train worker
    num_gpus: float = 0.0  # > 0: CUDA, NCCL and `use_gpu`
    # Torch threads of a CPU worker; 0 = max(1, int(num_cpus)). More than num_cpus is allowed
    # where the worker has the machine to itself once its data is loaded (one worker, 2 cores).
    threads: int = 0

    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


@dataclass
class ClusterConfig:
    """The Ray Train fields of a trainer's config (top-level keys of its YAML)."""

    num_workers: int = 1
    worker: WorkerResources = field(default_factory=WorkerResources)
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    keep_checkpoints: int = 3  # newest N kept; 0 = all
    ray: RayConfig = field(default_factory=RayConfig)
    # object-store access for s3:// paths (--data, --output, ...): actors/common/storage.py
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check_cluster(self) -> None:
        if self.num_workers < 1 or self.keep_checkpoints < 0 or self.max_failures < -1:
            raise ValueError("num_workers must be >= 1, keep_checkpoints >= 0, "
                             "max_failures >= -1 (-1 = unlimited)")


# ---------------------------------------------------------------------------------------------
# Ray Data context for training input


def keep_order(ctx: Any) -> None:
    """Operators hand on blocks in the order they took them. The DiT's planned input needs
    it for correctness: step numbers go in as start, start+1, ... and each `PlanLoader` block
    must reach the worker as that step's rows (`planned_batches` consumes steps in sequence and
    stops at a gap: "data stream is at step ..."). Streamed inputs keep it too, so a run reads
    its videos in the order it listed them."""
    ctx.execution_options.preserve_order = True


def no_progress_bars(ctx: Any) -> None:
    """The trainers print their own progress line; Ray Data's bars would interleave with it."""
    ctx.enable_progress_bars = False


def stream_split_config():
    """Split the pipelined stream across workers without dropping rows (`equal=False`):
    workers that run out first take zero-weight steps (actors/workers/train_dit.py)."""
    from ray.train import DataConfig

    class StreamSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                splits = ds.streaming_split(world_size, equal=False,
                                            locality_hints=worker_node_ids)
                for i, split in enumerate(splits):
                    output[i][name] = split
            return output

    return StreamSplit()


# ---------------------------------------------------------------------------------------------
# Run folders


def prepare_run(run: Path | Store, resume: bool) -> None:
    """A fresh run refuses a RUN that holds checkpoints (unless resuming) and clears what a
    failed start left behind (Ray's checkpoint folder, metrics). RUN may be an object-store
    prefix (a Store, proven writable by `output_store`)."""
    run = as_store(run)
    if not run.remote:
        writable_dir(run.path)
    if resume:
        return
    checkpoints = run.child("checkpoints")
    if any("/step_" in f.path for f in checkpoints.files()):
        raise TrainError(f"{run} already holds checkpoints: pass --resume to continue "
                         "that run, or choose a new --output")
    checkpoints.delete()  # Ray's state of a failed start
    run.child("metrics.jsonl").delete()


def committed_step(run: Path | Store) -> int:
    """Step of the last checkpoint Ray Train committed (written by `commit_log`), else 0."""
    latest = as_store(run).child("checkpoints", "latest.json")
    return int(json.loads(latest.read_text())["step"]) if latest.is_file() else 0


def commit_log(run: Store):
    from ray.train import UserCallback

    class CommitLog(UserCallback):
        """On the controller, once a checkpoint is committed: RUN/checkpoints/latest.json,
        which tells the data factories where a restarted run's stream begins."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is None:
                return
            run.child("checkpoints", "latest.json").write_text(json.dumps(
                {"step": int(metrics[0]["step"]), "path": checkpoint.path}))

    return CommitLog()


# ---------------------------------------------------------------------------------------------
# The trainer


def torch_trainer(cfg: ClusterConfig, worker: Any, run: Path | Store, loop_config: dict,
                  datasets: dict, dataset_config: Any) -> Any:
    """The TorchTrainer both trainers use: `worker(loop_config)` on `cfg.num_workers` workers
    of `cfg.worker` resources; checkpoints go to RUN/checkpoints (an object-store RUN: through
    its filesystem, `storage_filesystem`, the prefix without scheme as `storage_path`)."""
    run = as_store(run)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = cfg.worker.num_gpus > 0
    return TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=gpu,
            resources_per_worker={"CPU": cfg.worker.num_cpus, "GPU": cfg.worker.num_gpus}),
        run_config=RunConfig(
            name="checkpoints", storage_path=run.path,
            storage_filesystem=run.fs if run.remote else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
            callbacks=[commit_log(run)]),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def fit(trainer: Any, max_failures: int, run: Path) -> Any:
    """`trainer.fit()`; a run that used up its restarts raises TrainFailed (one line, with
    where the last checkpoint is and how to continue)."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainFailed(f"training failed after {max_failures} restart(s) (max_failures); "
                          f"last checkpoint in {run}/checkpoints, continue with --resume: "
                          f"{e}") from e
