"""`tubelet train-vae`: train the causal 3D VAE on Ray Train, fed by the decode stages.

    tubelet train-vae --input VIDEOS --output RUN [--config configs/train-vae/default.yaml]
                      [--val VIDEOS] [--workers N] [--resume] [--address ADDR]

Data: `clip_stages` = probe -> assign -> decode actor pools (the stages `preprocess` runs,
without the VAE encode), split across the Ray Train workers with `streaming_split`; each
worker keeps a buffer of decoded clips and trains on random crops of them
(actors/workers/train_vae.py). Held-out clips: `data.val_videos` videos of --input (chosen by
a seeded hash of their paths), or every video of --val; the driver decodes them once with the
same stages in-process and hands the workers fixed center crops.

RUN/: config.yaml, run.json (summary), metrics.jsonl (train rows every step, val rows every
`data.val_every` steps), loss.png, recon.png (held-out clips: original over reconstruction),
checkpoints/step_N (DCP + vae.safetensors), export/vae.safetensors (the trained VAE, for
`preprocess --vae` and `eval-vae --vae`), errors/ (inputs the stages could not use).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actors.common.stage import StageSpec, run_here
from actors.common.storage import Store, as_store, filesystem_of, local_copy
from actors.common.tensors import unpack
from actors.workers.train_vae import VAETrainLoopConfig, center_crops, with_init
from pipeline.config import ConfigError, output_store, to_dict, write_run_record
from pipeline.pools import sized, train_workers
from pipeline.ray_train import (
    ClusterConfig,
    TrainError,
    WorkerResources,
    fit,
    keep_order,
    no_progress_bars,
    prepare_run,
    stream_split_config,
    torch_trainer,
)
from pipeline.report import plot_curves, read_metrics, save_side_by_side
from pipeline.runtime import ray_session
from pipeline.sources import list_sources
from pipeline.streams import ClipConfig, clip_stages, stream


@dataclass
class VAEWorkerResources(WorkerResources):
    num_cpus: float = 1.0  # per Ray Train worker


@dataclass
class TrainVAEConfig(ClusterConfig, VAETrainLoopConfig):
    """configs/train-vae/*.yaml: the loop's fields (VAETrainLoopConfig), the Ray Train fields
    (ClusterConfig) and the decode side that feeds the workers."""

    worker: VAEWorkerResources = field(default_factory=VAEWorkerResources)
    preprocess: ClipConfig = field(default_factory=ClipConfig)  # buckets, decode pools

    def validate(self) -> None:
        VAETrainLoopConfig.validate(self)
        self.check_cluster()


def decoded(cfg: ClipConfig, sources: pa.Table, errors_dir: Any) -> pa.Table:
    """The stream's stages called in this process (no Ray): the decode stage's clip table
    (object-store videos read through their filesystem)."""
    fs = filesystem_of(sources.column("path").to_pylist(), cfg.storage)
    return run_here(sources, clip_stages(cfg, errors_dir, fs=fs))


def decode_here(cfg: ClipConfig, sources: pa.Table, errors_dir: Any
                ) -> tuple[list[dict], list[np.ndarray]]:
    """`decoded` as (clip rows, uint8 clips)."""
    table = decoded(cfg, sources, errors_dir)
    rows = table.select(["id", "path", "bucket", "start", "fps"]).to_pylist()
    return rows, unpack(table, "frames", np.uint8)


def split_sources(sources: pa.Table, n_val: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held-out): the n_val videos whose sha1(seed, file name) sorts first (the name,
    not the path, so a copied or moved dataset holds out the same videos; ties by path)."""
    paths = sources.column("path").to_pylist()
    keys = [(hashlib.sha1(f"{seed}|{os.path.basename(p)}".encode()).hexdigest(), p)
            for p in paths]
    order = sorted(range(len(paths)), key=keys.__getitem__)
    if len(paths) <= n_val:
        raise TrainError(f"--input has {len(paths)} videos; holding out data.val_videos="
                         f"{n_val} leaves none to train on (add videos, lower "
                         "data.val_videos, or pass --val)")
    val = sorted(order[:n_val])
    return sources.take(sorted(order[n_val:])), sources.take(val)


def held_out(cfg: TrainVAEConfig, sources: pa.Table, errors_dir: Any
             ) -> tuple[list[dict], list[np.ndarray]]:
    """Decoded held-out clips big enough for a crop (at most data.val_clips of them)."""
    d = cfg.data
    rows, clips = decode_here(cfg.preprocess, sources, errors_dir)
    keep = [i for i, c in enumerate(clips) if c.shape[0] >= d.crop_frames
            and min(c.shape[1:3]) >= d.crop_size][:d.val_clips]
    if not keep:
        raise TrainError(f"none of the {sources.num_rows} held-out videos gave a clip of at "
                         f"least {d.crop_frames}x{d.crop_size}x{d.crop_size} (see "
                         f"{errors_dir}); add videos or lower data.crop_*")
    return [rows[i] for i in keep], [clips[i] for i in keep]


def sources_and_held_out(cfg: TrainVAEConfig, input_src: str, val_src: str | None,
                         run: Path | Store
                         ) -> tuple[pa.Table, pa.Table, list[dict], list[np.ndarray], Any]:
    """(training videos, held-out videos, their clip rows, their clips, the held-out crops):
    `--val`'s videos, else `data.val_videos` of `--input` (`split_sources`)."""
    exts, storage = tuple(cfg.preprocess.video_extensions), cfg.preprocess.storage
    sources = list_sources(input_src, exts, storage)
    if val_src:
        train_src, val_sources = sources, list_sources(val_src, exts, storage)
    else:
        train_src, val_sources = split_sources(sources, cfg.data.val_videos, cfg.seed)
    val_rows, val_clips = held_out(cfg, val_sources, as_store(run).child("errors"))
    d = cfg.data
    val = center_crops(val_clips, (d.crop_frames, d.crop_size, d.crop_size))
    return train_src, val_sources, val_rows, val_clips, val


def resolve_init(cfg: TrainVAEConfig) -> TrainVAEConfig:
    """`cfg` with `model` the `init` VAE's (with_init; what the training loop and the resolved
    config take), for both runners; an unusable init is a ConfigError naming it."""
    try:
        return with_init(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_train_vae(cfg: TrainVAEConfig, input_src: str, output: str | Path,
                  val_src: str | None = None, resume: bool = False,
                  address: str | None = None) -> dict[str, Any]:
    from ray.data import DataContext

    from actors.workers.train_vae import ray_worker

    cfg = resolve_init(cfg)  # before Ray: a bad init path fails here
    inputs = filesystem_of([input_src], cfg.preprocess.storage)

    def graph(c: TrainVAEConfig) -> list[StageSpec]:
        return clip_stages(c.preprocess, run.child("errors"), fs=inputs)

    run = output_store(output, cfg.storage)
    workers = [train_workers(cfg)]
    cfg = sized("train-vae", cfg, graph, address, workers)  # before Ray
    prepare_run(run, resume)
    start = time.perf_counter()
    train_src, val_sources, val_rows, val_clips, val = sources_and_held_out(
        cfg, input_src, val_src, run)
    d = cfg.data
    print(f"[train-vae] {train_src.num_rows} training videos, {len(val_clips)} held-out clips "
          f"from {val_sources.num_rows} videos; {cfg.steps} steps of {d.batch_size} crops "
          f"({d.crop_frames}x{d.crop_size}x{d.crop_size}) x {cfg.num_workers} worker(s)",
          flush=True)
    resolved = to_dict(cfg)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     train_videos=train_src.num_rows, val_clips=len(val_clips))
    with ray_session(address, cfg.ray):
        cfg = sized("train-vae", cfg, graph, address, workers)  # a joined cluster's own size
        keep_order(DataContext.get_current())
        no_progress_bars(DataContext.get_current())
        trainer = torch_trainer(
            cfg, ray_worker, run, {"cfg": cfg, "run": run, "resolved": resolved, "val": val},
            {"train": stream(cfg.preprocess, train_src, graph(cfg))},
            stream_split_config())
        fit(trainer, cfg.max_failures, run)
    train_wall = time.perf_counter() - start
    summary = finish(cfg, run, val_rows, val_clips)
    summary.update(wall_seconds=round(time.perf_counter() - start, 2),
                   train_wall_seconds=round(train_wall, 2), train_videos=train_src.num_rows)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     **summary)
    return summary


def finish(cfg: TrainVAEConfig, run: Path | Store, val_rows: list[dict],
           val_clips: list[np.ndarray]) -> dict[str, Any]:
    """loss.png, recon.png and the exported VAE's PSNR / SSIM on the whole held-out clips."""
    import torch

    from actors.common.vae import load_checkpoint_vae
    from actors.common.video import frames_to_video, to_uint8
    from models.metrics import clip_metrics

    run = as_store(run)
    rows = read_metrics(run)
    plot_curves(rows, run.child("loss.png"))
    vae = load_checkpoint_vae(str(local_copy(run.child("export", "vae.safetensors"))))
    recons, per_clip = [], []
    with torch.inference_mode():
        for row, clip in zip(val_rows, val_clips, strict=True):
            recon = to_uint8(vae.decode(vae.encode(frames_to_video([clip]))))[0]
            recons.append(recon.numpy())
            per_clip.append({"path": row["path"], "bucket": row["bucket"],
                             **clip_metrics(torch.from_numpy(np.array(clip)), recon)})
    save_side_by_side(val_clips[:4], recons[:4], run.child("recon.png"))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    return {
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1]["loss"] if train else None,
        "val_loss": [(r["step"], round(r["loss"], 5)) for r in val],
        "val_psnr_crops": val[-1]["psnr"] if val else None,
        "held_out_psnr": float(np.mean([c["psnr"] for c in per_clip])),
        "held_out_ssim": float(np.mean([c["ssim"] for c in per_clip])),
        "held_out_clips": per_clip,
        "export": str(run.child("export", "vae.safetensors")),
    }
