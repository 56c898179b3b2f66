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

The model's input channels are a fact of the data: `model.in_channels` is set from the
dataset's `latent_shape` (`--data`) or from the VAE that encodes the stream (`--input`), and
the resolved config records it.

RUN/: config.yaml, run.json, metrics.jsonl, loss.png, checkpoints/step_N (sharded DCP + the
resolved config), export/ (EMA model.safetensors + config.json), workers/ (pid, host per rank).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.common.stage import StageResources, StageSpec, apply_all
from actors.common.storage import Store, as_store, check_reachable, filesystem_of, storage_reason
from actors.common.vae import VAELoadError, resolve_checkpoint, vae_normalisation
from actors.workers.train_data import BatchPlan, PlanLoader, read_index
from actors.workers.train_dit import LatentsRecord, TrainLoopConfig
from pipeline.config import output_store, to_dict, write_run_record
from pipeline.pools import check_workers, cluster_of, sized, train_workers
from pipeline.ray_train import (
    ClusterConfig,
    TrainError,
    committed_step,
    fit,
    keep_order,
    no_progress_bars,
    prepare_run,
    stream_split_config,
    torch_trainer,
)
from pipeline.report import plot_losses, read_metrics
from pipeline.runtime import ray_session
from pipeline.streams import PreprocessConfig, latent_channels, latent_stages, stream


@dataclass
class TrainConfig(ClusterConfig, TrainLoopConfig):
    """configs/train/*.yaml: the loop's fields (TrainLoopConfig), the Ray Train fields
    (ClusterConfig: num_workers, worker, max_failures, keep_checkpoints, ray) and these."""

    loader: StageResources = field(default_factory=lambda: StageResources(0.25, batch_size=1))
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # --input stages

    def validate(self) -> None:
        TrainLoopConfig.validate(self)
        self.check_cluster()


# ---------------------------------------------------------------------------------------------
# Data for the workers


def bound_read_ahead(ctx: Any, prefetch_steps: int) -> None:
    """Let a rank's planned stream run only a few steps ahead of training. Unbounded, Ray Data
    reads and loads steps as far ahead as the object store allows, and the executor thread
    inside the Train worker walks that growing backlog on every scheduling round, holding the
    GIL. Measured on the demo DiT: an 8000-step plan trained at 1.1-1.3 s/step where a 60-step
    plan took 0.45; bounded (with 8 read tasks), 0.93. The rest is the executor's own loop:
    `data.loader: worker` avoids it (0.46)."""
    from ray.data import ExecutionResources

    ctx.execution_options.resource_limits = ExecutionResources(
        object_store_memory=max(64, 16 * prefetch_steps) * 2**20)


def loader_stages(cfg: TrainConfig, index: pa.Table, rank: int, fs: Any = None
                  ) -> list[StageSpec]:
    """The `train --data` graph of one rank: planned step numbers -> its latent rows (`fs`:
    the dataset's filesystem when it is in an object store)."""
    return [PlanLoader.spec(cfg, index, rank, fs)]


@dataclass
class RankData:
    """Dataset factory for one rank; Ray Train calls it at every (re)start of the workers."""

    run: Store
    index: pa.Table
    cfg: TrainConfig
    rank: int
    fs: Any = None  # the dataset's filesystem (object store), None: local files

    def __call__(self):
        import ray.data

        from pipeline.step_source import StepSource

        start = committed_step(self.run)
        steps = ray.data.read_datasource(StepSource(start, max(start + 1, self.cfg.steps)),
                                         num_cpus=0.01)
        keep_order(steps.context)  # PlanLoader's output must arrive step by step
        no_progress_bars(steps.context)
        bound_read_ahead(steps.context, self.cfg.data.prefetch_steps)
        return apply_all(steps, loader_stages(self.cfg, self.index, self.rank, self.fs))


# ---------------------------------------------------------------------------------------------
# The job


def data_channels(index: pa.Table, data: str | Path) -> int:
    """The one channel count C of the dataset's `latent_shape` (C, T, H, W)."""
    channels = sorted({int(s[0]) for s in index.column("latent_shape").to_pylist()})
    if len(channels) != 1:
        raise TrainError(f"{data}: latents with {' and '.join(map(str, channels))} channels "
                         "(written by different VAEs); train on one dataset per VAE")
    return channels[0]


def with_channels(cfg: TrainConfig, channels: int) -> TrainConfig:
    """`cfg` with `model.in_channels` = the data's channel count (said when it changes)."""
    if channels != cfg.model.in_channels:
        print(f"[train] model.in_channels = {channels} (the latents' channels; the config "
              f"said {cfg.model.in_channels})", flush=True)
    return replace(cfg, model=replace(cfg.model, in_channels=channels))


def latents_record(vae: str, normalisation: dict[str, list[float]] | None = None
                   ) -> LatentsRecord:
    """What the export records of the VAE that made the latents: its path and its latent
    normalisation, as the dataset recorded it (`normalisation`) or else as the file says
    now (a diffusers folder's is fixed by the folder: not recorded)."""
    try:
        path = resolve_checkpoint(vae)
    except VAELoadError:
        path = ""
    norm = normalisation or vae_normalisation(path)
    if not norm:
        return LatentsRecord(vae=path or vae)
    return LatentsRecord(path, list(norm["scaling_factor"]), list(norm["shift_factor"]))


def data_vae(data: str | Path | Store) -> tuple[str, dict[str, list[float]] | None]:
    """The VAE a latent dataset was made with and the normalisation it encoded with, from the
    preprocess record (run.json) beside it (PRE/latents -> PRE/run.json); ("", None) when
    there is none."""
    data = as_store(data)
    for folder in (data, data.parent):
        record = folder.child("run.json")
        if record.is_file():
            run = json.loads(record.read_text())
            return str(run.get("vae") or ""), run.get("vae_normalisation")
    return "", None


def planned_data(cfg: TrainConfig, data: str | Path, world_size: int
                 ) -> tuple[TrainConfig, pa.Table, BatchPlan]:
    """(cfg with the data's channels and VAE record, the dataset's index, its plan over
    `world_size` workers); an unusable dataset is a TrainError naming it."""
    try:
        data = as_store(data, cfg.storage)
        check_reachable(data, "--data", must_exist=True)
        index = read_index(data)
        channels = data_channels(index, data)
        if cfg.finetune.init:
            cfg = finetune_config(cfg, index, data, channels)
        else:
            cfg = with_channels(cfg, channels)
            cfg = replace(cfg, latents=latents_record(*data_vae(data)))
        return cfg, index, BatchPlan(index, cfg.data, world_size)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    except OSError as e:  # an object store that refuses or does not answer
        raise TrainError(f"--data {data}: {storage_reason(e)}") from None


def finetune_config(cfg: TrainConfig, index: pa.Table, data: Store,
                    channels: int) -> TrainConfig:
    """`--init FOLDER`: `cfg` with the flow shift of the folder's scheduler (unless
    finetune.shift is set) and the folder's VAE recorded, after checking, each in one line,
    that the folder is a pipeline we fine-tune, that the latents have its transformer's
    channels and that every clip's caption features were made by its text encoder."""
    import pyarrow.parquet as pq

    from models.finetune import scheduler_shift, trainable_record
    from models.pipelines import PipelineError, text_encoder_id, vae_folder

    tune = cfg.finetune
    try:
        record = trainable_record(tune.init)
    except PipelineError as e:
        raise TrainError(f"--init: {e}") from None
    if channels != record.latent_channels:
        raise TrainError(f"{data}: latents with {channels} channels, the transformer of "
                         f"{tune.init} takes {record.latent_channels}; preprocess the videos "
                         f"with --model {tune.init}")
    want = text_encoder_id(record)
    found: set[str | None] = set()
    for f in sorted(set(index.column("file").to_pylist())):
        with data.fs.open_input_file(f) as handle:
            table = pq.ParquetFile(handle)
            if "text_encoder" not in table.schema_arrow.names:
                found.add(None)
                continue
            found.update(table.read(columns=["text_encoder"]).column(0).unique().to_pylist())
    if found != {want}:
        other = sorted(str(x) for x in found - {want})
        raise TrainError(f"{data}: caption features from {', '.join(other)} (no features: "
                         f"None), not from {want}, the text encoder of {tune.init}; preprocess "
                         f"the videos with --model {tune.init}")
    shift = tune.shift or scheduler_shift(record)
    what = f"LoRA rank {tune.lora.rank}" if tune.lora.rank else "full"
    print(f"[train] fine-tuning the {record.components['transformer']} of {record.folder} "
          f"({what}); flow shift {shift:g}", flush=True)
    return replace(cfg, finetune=replace(tune, init=str(record.folder)),
                   flow=replace(cfg.flow, resolution_shift=False, shift_scale=shift),
                   latents=LatentsRecord(vae=str(vae_folder(record))))


def run_train(cfg: TrainConfig, output: str | Path, data: str | Path | None = None,
              input_src: str | None = None, resume: bool = False,
              address: str | None = None) -> dict[str, Any]:
    from ray.data import DataContext
    from ray.train import DataConfig

    from actors.workers.train_dit import ray_worker

    if (data is None) == (input_src is None):
        raise TrainError("give exactly one of --data (a latent dataset) or --input (videos)")
    streaming = input_src is not None
    if streaming and cfg.finetune.init:
        raise TrainError("--init trains on caption features precomputed by `tubelet preprocess "
                         "--model FOLDER`: pass its DIR/latents with --data, not --input")

    run = output_store(output, cfg.storage)
    inputs = filesystem_of([input_src], cfg.storage) if streaming else None

    def graph(c: TrainConfig) -> list[StageSpec]:  # --input: videos -> latents, streamed
        return latent_stages(c.preprocess, run.child("errors"), fs=inputs)

    workers = [train_workers(cfg)]
    if streaming:  # pools + workers this machine cannot hold: refused before Ray starts
        cfg = sized("train", cfg, graph, address, workers)
    elif (local := cluster_of(address, cfg.ray.num_cpus)) is not None and local.fixed:
        check_workers(cfg.num_workers, cfg.worker.num_cpus, cfg.worker.num_gpus, local)
    prepare_run(run, resume)
    start = time.perf_counter()
    fingerprint, counts, datasets, data_fs = "", {}, {}, None
    if streaming:
        try:
            cfg = with_channels(cfg, latent_channels(cfg.preprocess.vae))
            cfg = replace(cfg, latents=latents_record(cfg.preprocess.vae.checkpoint))
        except ValueError as e:  # no such VAE checkpoint, not a VAE, unknown preset
            raise TrainError(f"preprocess.vae: {e}") from None
    else:
        data = as_store(data, cfg.storage)
        cfg, index, plan = planned_data(cfg, data, cfg.num_workers)
        data_fs = data.fs if data.remote else None
        counts = dict(sorted(Counter(index.column("bucket").to_pylist()).items()))
        fingerprint = plan.fingerprint
        print(f"[train] {index.num_rows} clips in {len(counts)} buckets "
              f"({', '.join(f'{b}: {n}' for b, n in counts.items())}); "
              f"{plan.steps_per_epoch} steps per epoch, {cfg.steps} steps "
              f"= {cfg.steps / plan.steps_per_epoch:.1f} epochs", flush=True)
        if cfg.data.loader == "ray":
            datasets = {f"rank{r}": RankData(run, index, cfg, r, data_fs)
                        for r in range(cfg.num_workers)}
    resolved = to_dict(cfg)
    write_run_record(run, "train", cfg, data=str(data) if data else None, input=input_src,
                     resume=resume, clips=sum(counts.values()), buckets=counts)
    with ray_session(address, cfg.ray):
        keep_order(DataContext.get_current())
        no_progress_bars(DataContext.get_current())
        if streaming:
            cfg = sized("train", cfg, graph, address, workers)  # a joined cluster's own size
            datasets = {"train": stream(cfg.preprocess, input_src, graph(cfg))}
        trainer = torch_trainer(
            cfg, ray_worker, run,
            {"cfg": cfg, "run": run, "resolved": resolved, "fingerprint": fingerprint,
             "stream": streaming, "index": None if streaming else index, "data_fs": data_fs},
            datasets,
            stream_split_config() if streaming else DataConfig(datasets_to_split=[]))
        result = fit(trainer, cfg.max_failures, run)
    wall = time.perf_counter() - start
    rows = read_metrics(run)
    plot_losses(rows, run.child("loss.png"))
    summary = {"steps": rows[-1]["step"] if rows else 0, "wall_seconds": round(wall, 2),
               "final_loss": rows[-1]["loss"] if rows else None,
               "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "export": str(run.child("export")), "clips": sum(counts.values()),
               "buckets": counts}
    write_run_record(run, "train", cfg, data=str(data) if data else None, input=input_src,
                     resume=resume, **summary)
    return summary
