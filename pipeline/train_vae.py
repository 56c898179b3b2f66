"""`tubelet train-vae`: train the causal 3D VAE on Ray Train, fed by the decode stages.

    tubelet train-vae --input VIDEOS --output RUN [--config configs/vae/default.yaml]
                      [--val VIDEOS] [--workers N] [--resume] [--address ADDR]

Data: `clip_stream` = probe -> assign -> decode actor pools (the stages `preprocess` runs,
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

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from actors.assign import AssignStage
from actors.common.tensors import unpack
from actors.decode import DecodeStage
from actors.probe import ProbeStage
from actors.workers.train_vae import VAETrainLoopConfig, center_crops, train_vae_loop
from pipeline.config import ConfigError, to_dict, write_run_record
from pipeline.preprocess import PreprocessConfig, clip_stream
from pipeline.runtime import RayConfig, StageResources, check_budget, init_ray
from pipeline.sources import list_sources
from pipeline.train import (
    TrainError,
    TrainFailed,
    fit,
    prepare_run,
    quiet,
    read_metrics,
    stream_split_config,
    torch_trainer,
)


@dataclass
class VAEWorkerResources:
    num_cpus: float = 1.0  # per Ray Train worker
    num_gpus: float = 0.0  # > 0: CUDA, NCCL and `use_gpu`
    threads: int = 0  # torch threads of a CPU worker; 0 = max(1, int(num_cpus))


@dataclass
class VAEEvalConfig:
    """`tubelet eval-vae` (and the final held-out check of train-vae)."""

    stage: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=4))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tile_px: int = 0  # > 0: tiled encode/decode (bounded memory for large frames)
    crf: int = 18  # h264 quality of the reconstructed mp4s (--videos)

    def validate(self) -> None:
        if self.tile_px < 0 or not 0 <= self.crf <= 51:
            raise ValueError("tile_px: must be >= 0; crf: must be in [0, 51]")


@dataclass
class TrainVAEConfig(VAETrainLoopConfig):
    """Every file in configs/vae/: train-vae reads all of it, eval-vae `preprocess`, `eval`
    and `ray`."""

    num_workers: int = 1
    worker: VAEWorkerResources = field(default_factory=VAEWorkerResources)
    max_failures: int = 2  # worker failures survived (restart from the last checkpoint)
    keep_checkpoints: int = 3  # newest N kept; 0 = all
    ray: RayConfig = field(default_factory=RayConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # buckets, decode
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)

    def validate(self) -> None:
        super().validate()
        if self.num_workers < 1 or self.keep_checkpoints < 0 or self.max_failures < -1:
            raise ValueError("num_workers must be >= 1, keep_checkpoints >= 0, "
                             "max_failures >= -1 (-1 = unlimited)")

    def stages(self) -> dict[str, StageResources]:
        """The decode-side actor pools (what `check_budget` weighs)."""
        p = self.preprocess
        return {"probe": p.probe, "assign": p.assign, "decode": p.decode}


def decode_here(cfg: PreprocessConfig, sources: pa.Table, errors_dir: str | Path | None
                ) -> tuple[list[dict], list[np.ndarray]]:
    """The same stages called in this process (no Ray): (clip rows, uint8 clips)."""
    errors = str(errors_dir) if errors_dir is not None else None
    table = ProbeStage(errors, cfg.max_pixels, cfg.max_side)(sources)
    table = AssignStage(cfg.buckets, errors)(table)
    table = DecodeStage(errors, cfg.decode_threads)(table)
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


def held_out(cfg: TrainVAEConfig, sources: pa.Table, errors_dir: Path
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


def _worker(args: dict[str, Any]) -> None:
    import ray.train
    import torch

    from actors.workers.train_dit import RayBackend

    cfg: TrainVAEConfig = args["cfg"]
    backend = RayBackend()
    if backend.device.type == "cpu":
        torch.set_num_threads(cfg.worker.threads or max(1, int(cfg.worker.num_cpus)))
    shard = ray.train.get_dataset_shard("train")

    def source():
        return shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                  prefetch_batches=cfg.data.prefetch_batches)

    try:
        train_vae_loop(cfg, backend, source, Path(args["run"]), args["resolved"], args["val"])
    finally:
        backend.stack.close()


def run_train_vae(cfg: TrainVAEConfig, input_src: str, output: str | Path,
                  val_src: str | None = None, resume: bool = False,
                  address: str | None = None) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    run = Path(output).resolve()
    prepare_run(run, resume)
    start = time.perf_counter()
    exts = tuple(cfg.preprocess.video_extensions)
    sources = list_sources(input_src, exts)
    if val_src:
        train_src, val_sources = sources, list_sources(val_src, exts)
    else:
        train_src, val_sources = split_sources(sources, cfg.data.val_videos, cfg.seed)
    val_rows, val_clips = held_out(cfg, val_sources, run / "errors")
    d = cfg.data
    val = center_crops(val_clips, (d.crop_frames, d.crop_size, d.crop_size))
    print(f"[train-vae] {train_src.num_rows} training videos, {len(val_clips)} held-out clips "
          f"from {val_sources.num_rows} videos; {cfg.steps} steps of {d.batch_size} crops "
          f"({d.crop_frames}x{d.crop_size}x{d.crop_size}) x {cfg.num_workers} worker(s)",
          flush=True)
    resolved = to_dict(cfg)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     train_videos=train_src.num_rows, val_clips=len(val_clips))
    started = init_ray(address, cfg.ray)
    try:
        if started and not address:
            check_budget({**cfg.stages(), "train workers": StageResources(
                cfg.worker.num_cpus, max_actors=cfg.num_workers)})
        quiet(DataContext.get_current())
        trainer = torch_trainer(
            cfg, _worker, run, {"cfg": cfg, "run": str(run), "resolved": resolved, "val": val},
            {"train": clip_stream(cfg.preprocess, train_src, run / "errors")},
            stream_split_config())
        fit(trainer, cfg.max_failures, run)
    finally:
        if started:
            ray.shutdown()
    train_wall = time.perf_counter() - start
    summary = finish(cfg, run, val_rows, val_clips)
    summary.update(wall_seconds=round(time.perf_counter() - start, 2),
                   train_wall_seconds=round(train_wall, 2), train_videos=train_src.num_rows)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     **summary)
    return summary


def finish(cfg: TrainVAEConfig, run: Path, val_rows: list[dict], val_clips: list[np.ndarray]
           ) -> dict[str, Any]:
    """loss.png, recon.png and the exported VAE's PSNR / SSIM on the whole held-out clips."""
    import torch

    from actors.vae_encode import frames_to_video
    from actors.vae_eval import clip_metrics, load_eval_vae, to_uint8

    rows = read_metrics(run)
    plot_curves(rows, run / "loss.png")
    vae = load_eval_vae(str(run / "export" / "vae.safetensors"))
    recons, per_clip = [], []
    with torch.inference_mode():
        for row, clip in zip(val_rows, val_clips, strict=True):
            recon = to_uint8(vae.decode(vae.encode(frames_to_video([clip]))))[0]
            recons.append(recon.numpy())
            per_clip.append({"path": row["path"], "bucket": row["bucket"],
                             **clip_metrics(torch.from_numpy(np.array(clip)), recon)})
    save_side_by_side(val_clips[:4], recons[:4], run / "recon.png")
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
        "export": str(run / "export" / "vae.safetensors"),
    }


def plot_curves(rows: list[dict], png: Path) -> None:
    """Train loss (and its running mean) with the held-out loss; PSNR of both below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, axis, label in (("loss", ax, "loss"), ("psnr", bx, "PSNR (dB)")):
        steps, values = [r["step"] for r in train], np.array([r[key] for r in train])
        k = max(1, len(values) // 20)
        axis.plot(steps, values, alpha=0.3, label=f"train {key}")
        axis.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, "valid"),
                  label=f"train, mean of {k}")
        axis.plot([r["step"] for r in val], [r[key] for r in val], "o-", label=f"held-out {key}")
        axis.set(ylabel=label)
        axis.legend()
    ax.set(yscale="log", title=png.parent.name)
    bx.set(xlabel="step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def save_side_by_side(originals: list[np.ndarray], recons: list[np.ndarray], png: Path) -> None:
    """Per clip: its first, middle and last frame; original row above reconstruction row."""
    import matplotlib.pyplot as plt

    tiles = []
    for a, b in zip(originals, recons, strict=True):
        ts = sorted({0, a.shape[0] // 2, a.shape[0] - 1})
        gap = np.full((a.shape[1], 4, 3), 255, np.uint8)
        top = np.concatenate([x for t in ts for x in (a[t], gap)][:-1], axis=1)
        bottom = np.concatenate([x for t in ts for x in (b[t], gap)][:-1], axis=1)
        tiles.append(np.concatenate([top, np.full((2, top.shape[1], 3), 255, np.uint8),
                                     bottom], axis=0))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 8), (0, width - t.shape[1]), (0, 0)), constant_values=255)
             for t in tiles]
    plt.imsave(png, np.concatenate(tiles, axis=0))


# ---------------------------------------------------------------------------------------------
# CLI


def register_train_vae(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-vae",
        help="train the causal 3D VAE on Ray Train, fed by the decode stages",
        description="Stream videos through probe, bucket and decode actor pools into Ray Train "
        "workers (DDP) that train the video VAE on random crops. Validation loss on held-out "
        "clips, checkpoints, RUN/metrics.jsonl, RUN/loss.png, RUN/recon.png and the trained "
        "VAE in RUN/export/vae.safetensors.",
    )
    p.add_argument("--input", required=True,
                   help="videos: a folder (recursive), a glob, or a .jsonl/.csv/.parquet manifest")
    p.add_argument("--output", required=True, type=Path, help="run directory")
    p.add_argument("--val", default=None,
                   help="held-out videos (default: data.val_videos videos of --input)")
    p.add_argument("--workers", type=int, help="Ray Train workers (config: num_workers)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(run=run_train_vae_command)


def resolve_vae_config(args: argparse.Namespace, flags: dict[str, Any]) -> TrainVAEConfig:
    """--config (default configs/vae/default.yaml) <- --set <- flags; the model's own checks
    (models.vae.VAEConfig raises ValueError) become one-line config errors too."""
    from pipeline.cli import resolve_config

    try:
        return resolve_config(TrainVAEConfig, "vae", args, flags)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = args.config or "configs/vae/default.yaml"
        raise ConfigError(f"{where}: model: {str(e).splitlines()[0]}") from None


def run_train_vae_command(args: argparse.Namespace) -> int:
    from pipeline.sources import SourceError

    cfg = resolve_vae_config(args, {"num_workers": args.workers})
    try:
        summary = run_train_vae(cfg, args.input, args.output, val_src=args.val,
                                resume=args.resume, address=args.address)
    except (TrainError, SourceError) as e:
        print(f"tubelet train-vae: {e}", file=sys.stderr)
        return 2
    except TrainFailed as e:
        print(f"tubelet train-vae: {e}", file=sys.stderr)
        return 1
    print(f"trained {summary['steps']} steps in {summary['wall_seconds']}s; held-out "
          f"PSNR {summary['held_out_psnr']:.2f} dB, SSIM {summary['held_out_ssim']:.4f}; "
          f"VAE in {summary['export']}")
    return 0
