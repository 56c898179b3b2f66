"""`tubelet train`: a DiT on Ray Train, FSDP2-sharded workers fed by Ray Data.

    tubelet train --data RUN_PRE/latents --output RUN [--workers N] [--resume]
    tubelet train --input VIDEOS --output RUN     # pipelined: decode + VAE actors feed training

Data (`--data`): the driver reads the dataset's index (id, bucket, shape; no latents) and every
worker gets its own Ray Data stream: step numbers -> `PlanLoader` actors (read this worker's
rows of each step from Parquet) -> `get_dataset_shard("rank<r>")`. The stream starts at the
last committed checkpoint's step, so a restart reads nothing twice (actors/workers/train_data.py has
the plan and the last-partial-batch policy).
Pipelined (`--input`): probe -> assign -> decode -> VAE encode actors, split across workers
with `streaming_split`; each worker cuts its rows into single-bucket batches. Nothing is
materialised; every epoch decodes again. Resume restores weights and step, not the order.

RUN/: config.yaml, run.json, metrics.jsonl, loss.png, checkpoints/step_N (sharded DCP + the
resolved config), export/ (EMA model.safetensors + config.json), workers/ (pid, host per rank).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from actors.workers.train_data import (
    BatchPlan,
    Collate,
    PlanLoader,
    planned_batches,
    read_index,
    streamed_batches,
)
from actors.workers.train_dit import RayBackend, TrainLoopConfig, train_loop
from models.text_encoder import ByteTokenizer
from pipeline.config import to_dict, write_run_record
from pipeline.preprocess import PreprocessConfig, latent_stream
from pipeline.runtime import RayConfig, StageResources, init_ray


@dataclass
class WorkerResources:
    num_cpus: float = 0.5  # per Ray Train worker; torch threads = max(1, int(num_cpus))
    num_gpus: float = 0.0  # > 0: CUDA, NCCL and `use_gpu`


@dataclass
class TrainConfig(TrainLoopConfig):
    num_workers: int = 1
    worker: WorkerResources = field(default_factory=WorkerResources)
    loader: StageResources = field(default_factory=lambda: StageResources(0.25, batch_size=1))
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    keep_checkpoints: int = 3  # newest N kept; 0 = all
    ray: RayConfig = field(default_factory=RayConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # --input stages

    def validate(self) -> None:
        super().validate()
        if self.num_workers < 1 or self.keep_checkpoints < 0 or self.max_failures < -1:
            raise ValueError("num_workers must be >= 1, keep_checkpoints >= 0, "
                             "max_failures >= -1 (-1 = unlimited)")


class TrainError(ValueError):
    """A run that cannot start as asked (bad data, occupied output); one line for the user."""


class TrainFailed(RuntimeError):
    """Workers failed more often than `max_failures` allows."""


# ---------------------------------------------------------------------------------------------
# Data for the workers


def quiet(ctx: Any) -> None:
    """Ray Data settings for training input: steps in order, no progress bars (the trainer
    prints its own progress line)."""
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def committed_step(run: Path) -> int:
    """Step of the last checkpoint Ray Train committed (written by `CommitLog`), else 0."""
    path = run / "checkpoints" / "latest.json"
    return int(json.loads(path.read_text())["step"]) if path.is_file() else 0


class StepSource(Datasource):
    """Ray Data source of the step numbers [start, end), one block per step, in order."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def estimate_inmemory_data_size(self) -> int:
        return 8 * (self.end - self.start)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        n = max(1, min(parallelism, self.end - self.start, 256))
        cuts = [self.start + (self.end - self.start) * i // n for i in range(n + 1)]
        return [ReadTask(lambda lo=lo, hi=hi: (pa.table({"step": [s]}) for s in range(lo, hi)),
                         BlockMetadata(hi - lo, 8 * (hi - lo), None, None))
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]


@dataclass
class RankData:
    """Dataset factory for one rank; Ray Train calls it at every (re)start of the workers."""

    run: Path
    index: pa.Table
    cfg: TrainConfig
    rank: int

    def __call__(self):
        import ray.data

        start = committed_step(self.run)
        steps = ray.data.read_datasource(StepSource(start, max(start + 1, self.cfg.steps)),
                                         num_cpus=0.01)
        quiet(steps.context)
        return steps.map_batches(PlanLoader, **self.cfg.loader.map_batches_kwargs(
            index=self.index, data=self.cfg.data, world_size=self.cfg.num_workers,
            rank=self.rank))


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
# Ray Train: the worker function and its backend


def _worker(args: dict[str, Any]) -> None:
    import ray.train
    import torch

    cfg: TrainConfig = args["cfg"]
    backend = RayBackend()
    if backend.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.worker.num_cpus)))
    collate = Collate(ByteTokenizer(cfg.text_encoder.max_len))
    r, W = backend.rank, backend.world_size
    if args["stream"]:
        batches = streamed_batches(ray.train.get_dataset_shard("train"), collate, cfg.data,
                                   r, W)
    else:
        batches = planned_batches(ray.train.get_dataset_shard(f"rank{r}"), collate,
                                  cfg.data.prefetch_steps)
    try:
        train_loop(cfg, backend, batches, Path(args["run"]), args["resolved"],
                   args["fingerprint"], stream=args["stream"])
    finally:
        backend.stack.close()


def commit_log(run: Path):
    from ray.train import UserCallback

    class CommitLog(UserCallback):
        """On the controller, once a checkpoint is committed: RUN/checkpoints/latest.json,
        which tells the data factories where a restarted run's stream begins."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if checkpoint is None:
                return
            latest = run / "checkpoints" / "latest.json"
            tmp = latest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": int(metrics[0]["step"]),
                                       "path": checkpoint.path}))
            tmp.replace(latest)

    return CommitLog()


# ---------------------------------------------------------------------------------------------
# The job


def check_data(cfg: TrainConfig, index: pa.Table) -> dict[str, int]:
    """Clips per bucket; refuses latents the model cannot take."""
    shapes = sorted({tuple(s) for s in index.column("latent_shape").to_pylist()})
    bad = [s for s in shapes if s[0] != cfg.model.in_channels]
    if bad:
        raise TrainError(f"latents have {bad[0][0]} channels (shape {bad[0]}) but "
                         f"model.in_channels is {cfg.model.in_channels}; set "
                         f"--set model.in_channels={bad[0][0]}")
    return dict(sorted(Counter(index.column("bucket").to_pylist()).items()))


def run_train(cfg: TrainConfig, output: str | Path, data: str | Path | None = None,
              input_src: str | None = None, resume: bool = False,
              address: str | None = None) -> dict[str, Any]:
    import ray
    from ray.data import DataContext
    from ray.train import DataConfig

    if (data is None) == (input_src is None):
        raise TrainError("give exactly one of --data (a latent dataset) or --input (videos)")
    run = Path(output).resolve()
    prepare_run(run, resume)
    stream = input_src is not None
    resolved = to_dict(cfg)
    start = time.perf_counter()
    fingerprint, counts, datasets = "", {}, {}
    if not stream:
        try:
            index = read_index(data)
            plan = BatchPlan(index, cfg.data, cfg.num_workers)
        except (ValueError, FileNotFoundError) as e:
            raise TrainError(str(e)) from None
        counts = check_data(cfg, index)
        fingerprint = plan.fingerprint
        print(f"[train] {index.num_rows} clips in {len(counts)} buckets "
              f"({', '.join(f'{b}: {n}' for b, n in counts.items())}); "
              f"{plan.steps_per_epoch} steps per epoch, {cfg.steps} steps "
              f"= {cfg.steps / plan.steps_per_epoch:.1f} epochs", flush=True)
        datasets = {f"rank{r}": RankData(run, index, cfg, r) for r in range(cfg.num_workers)}
    write_run_record(run, "train", cfg, data=str(data) if data else None, input=input_src,
                     resume=resume, clips=sum(counts.values()), buckets=counts)
    started = init_ray(address, cfg.ray)
    try:
        quiet(DataContext.get_current())
        if stream:
            datasets = {"train": latent_stream(cfg.preprocess, input_src, run / "errors")}
        trainer = torch_trainer(
            cfg, _worker, run,
            {"cfg": cfg, "run": str(run), "resolved": resolved, "fingerprint": fingerprint,
             "stream": stream},
            datasets,
            stream_split_config() if stream else DataConfig(datasets_to_split=[]))
        result = fit(trainer, cfg.max_failures, run)
    finally:
        if started:
            ray.shutdown()
    wall = time.perf_counter() - start
    rows = read_metrics(run)
    plot_losses(rows, run / "loss.png")
    summary = {"steps": rows[-1]["step"] if rows else 0, "wall_seconds": round(wall, 2),
               "final_loss": rows[-1]["loss"] if rows else None,
               "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "export": str(run / "export"), "clips": sum(counts.values()), "buckets": counts}
    write_run_record(run, "train", cfg, data=str(data) if data else None, input=input_src,
                     resume=resume, **summary)
    return summary


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def plot_losses(rows: list[dict], png: Path) -> None:
    """Loss per step and a running mean (the raw loss is noisy: t is random per sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return
    steps, loss = [r["step"] for r in rows], np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title=png.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def prepare_run(run: Path, resume: bool) -> None:
    """A fresh run refuses a RUN that holds checkpoints (unless resuming) and clears what a
    failed start left behind (Ray's checkpoint folder, metrics)."""
    if resume:
        return
    if any((run / "checkpoints").glob("step_*")):
        raise TrainError(f"{run} already holds checkpoints: pass --resume to continue "
                         "that run, or choose a new --output")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # Ray's state of a failed start
    (run / "metrics.jsonl").unlink(missing_ok=True)


def fit(trainer: Any, max_failures: int, run: Path) -> Any:
    """`trainer.fit()`; a run that used up its restarts raises TrainFailed (one line, with
    where the last checkpoint is and how to continue)."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainFailed(f"training failed after {max_failures} restart(s) (max_failures); "
                          f"last checkpoint in {run / 'checkpoints'}, continue with --resume: "
                          f"{e}") from e


def torch_trainer(cfg: Any, worker: Any, run: Path, loop_config: dict, datasets: dict,
                  dataset_config: Any) -> Any:
    """The TorchTrainer both trainers (DiT, VAE) use: `cfg` has num_workers, worker
    {num_cpus, num_gpus}, max_failures and keep_checkpoints; checkpoints go to RUN/checkpoints."""
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
            name="checkpoints", storage_path=str(run),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
            callbacks=[commit_log(run)]),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the DiT on Ray Train: FSDP2 workers fed by Ray Data",
        description="Train a video DiT (and its text encoder) with FSDP2-sharded Ray Train "
        "workers. Sharded checkpoints every checkpoint_every steps, an exported EMA model in "
        "RUN/export, metrics in RUN/metrics.jsonl and RUN/loss.png.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="latent dataset (DIR/latents of preprocess)")
    src.add_argument("--input", help="videos: stream them through decode + VAE into training "
                     "(no latent copy; config section 'preprocess')")
    p.add_argument("--output", required=True, type=Path, help="run directory")
    p.add_argument("--workers", type=int, help="Ray Train workers (config: num_workers)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pipeline.cli import resolve_config

    cfg = resolve_config(TrainConfig, "train", args, {"num_workers": args.workers})
    try:
        summary = run_train(cfg, args.output, data=args.data, input_src=args.input,
                            resume=args.resume, address=args.address)
    except TrainError as e:
        print(f"tubelet train: {e}", file=sys.stderr)
        return 2
    except TrainFailed as e:
        print(f"tubelet train: {e}", file=sys.stderr)
        return 1
    print(f"trained {summary['steps']} steps in {summary['wall_seconds']}s; final loss "
          f"{summary['final_loss']:.4f}; EMA model in {summary['export']}")
    return 0
