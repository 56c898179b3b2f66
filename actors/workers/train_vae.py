"""The VAE training loop every Ray Train worker runs (and one process runs without Ray).

Data: decoded clips (uint8 T, H, W, 3, from the decode stage) stream into a bounded
per-worker `ClipBuffer` (actors/workers/vae_clips.py), filled by a background thread so that
decoding overlaps training. Each step samples `data.batch_size` random crops from the buffer
(random clip, time window and position, random horizontal flip). Once a pass over the videos
ends on every worker, the next pass starts (`data.passes`; 0 = keep re-reading); with
`passes: 1` the buffer keeps the dataset (up to `data.buffer_mb`) and training goes on from
memory without decoding again.

Model: DDP over the default process group (gloo on CPU, NCCL on GPU; one process is a 1-rank
group, so the same code path runs everywhere). A worker whose buffer is still empty takes a
zero-weight step, so the ranks stay in lockstep and the gradient is the mean over real crops.
Loss: `models.vae.vae_loss` (L1 + kl_weight * KL + grad_weight * spatial-gradient L1) plus an
optional mse_weight * MSE.

Validation: rank 0, on a fixed held-out set of crops decoded once by the driver, with the
weights that get exported (the EMA), every `val_every` steps, before the first step and at
the end. Checkpoints: sharded DCP (model, optimizer, EMA, step; actors/workers/checkpoints.py),
plus `vae.safetensors` (the EMA weights, scaling fitted), usable directly by `eval-vae` and
`preprocess`. The export `RUN/export/vae.safetensors` is the same file at the last step.

The pieces this loop shares with the DiT trainer (backend, process group, optimizer step,
metrics, progress) are in actors/workers/toolkit.py; `ray_worker` runs it in a Ray Train worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from actors.common.video import to_video
from actors.workers.checkpoints import EMA
from actors.workers.toolkit import (
    Backend,
    MetricsLog,
    OptimConfig,
    Progress,
    RunFolder,
    due,
    elapsed,
    memory_mb,
    optimizer_step,
    process_group,
    ray_backend,
    reduce_sum,
    sample_seed,
    say,
    set_lr,
    train_state,
)
from actors.workers.vae_clips import ClipBuffer, ClipStream
from models.device import torch_dtype
from models.metrics import psnr_from_mse
from models.vae import PRESETS, VAEConfig, VideoVAE, read_vae_config, save_vae, vae_loss


@dataclass
class VAELossConfig:
    kl_weight: float = 1e-6
    grad_weight: float = 0.0  # spatial-gradient L1: a cheap perceptual stand-in (vae_loss)
    mse_weight: float = 0.0  # extra MSE term (PSNR is an MSE measure)

    def validate(self) -> None:
        if min(self.kl_weight, self.grad_weight, self.mse_weight) < 0:
            raise ValueError("kl_weight, grad_weight and mse_weight: must be >= 0")


@dataclass
class VAEStage:
    """A leading phase of training with its own crops (e.g. image-first: crop_frames 1)."""

    steps: int  # how long this stage lasts
    crop_frames: int = 1  # 1 + 4k; 1 = single images (the causal VAE encodes them alone)
    crop_size: int = 64
    batch_size: int = 8

    def validate(self) -> None:
        if min(self.steps, self.crop_frames, self.crop_size, self.batch_size) < 1:
            raise ValueError("stages: steps, crop_frames, crop_size, batch_size must be >= 1")


@dataclass
class VAEDataConfig:
    batch_size: int = 4  # crops per worker per step (global batch = batch_size x workers)
    crop_frames: int = 9  # 1 + 4k; clips shorter or smaller than the crop are not used
    crop_size: int = 64  # square crops, a multiple of the VAE's spatial factor
    flip: bool = True  # random horizontal flips
    buffer_mb: int = 512  # decoded clips kept per worker; when full, new clips replace old
    passes: int = 1  # passes over the training videos (each decodes again); 0 = until done
    prefetch_batches: int = 2  # Ray Data blocks fetched ahead of the buffer's thread
    val_videos: int = 4  # held out from --input (unless --val is given)
    val_clips: int = 8  # at most this many held-out clips (center crops of the crop size)
    val_every: int = 50  # validation every N steps, before the first and after the last
    # Stages run first, in order (e.g. images, then short clips); the crops above (and the
    # held-out crops) are those of the last phase, until `steps`.
    stages: list[VAEStage] = field(default_factory=list)

    def crop_at(self, step: int) -> tuple[int, int, int]:
        """(crop_frames, crop_size, batch_size) of training step `step` (0-based)."""
        for stage in self.stages:
            if step < stage.steps:
                return stage.crop_frames, stage.crop_size, stage.batch_size
            step -= stage.steps
        return self.crop_frames, self.crop_size, self.batch_size

    def largest_crop(self) -> tuple[int, int, int]:
        """(frames, size, size) every usable clip must hold: the largest of every phase."""
        frames = max([self.crop_frames, *(s.crop_frames for s in self.stages)])
        size = max([self.crop_size, *(s.crop_size for s in self.stages)])
        return frames, size, size

    def validate(self) -> None:
        if min(self.batch_size, self.crop_frames, self.crop_size, self.buffer_mb,
               self.val_clips, self.val_every, self.prefetch_batches) < 1:
            raise ValueError("batch_size, crop_frames, crop_size, buffer_mb, val_clips, "
                             "val_every, prefetch_batches: must be >= 1")
        if self.passes < 0 or self.val_videos < 0:
            raise ValueError("passes and val_videos: must be >= 0")


@dataclass
class VAETrainLoopConfig:
    """What one worker needs; `tubelet train-vae`'s TrainVAEConfig adds cluster settings."""

    model: VAEConfig = field(default_factory=PRESETS["debug"])
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20,
                                                                   ema_decay=0.0))
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    steps: int = 1000
    seed: int = 0  # model init, crops and posterior noise (per step and rank)
    log_every: int = 10
    checkpoint_every: int = 500  # and at the end
    export_dtype: Literal["float32", "float16"] = "float32"  # of every vae.safetensors written
    # Latent normalisation fitted at export: "channel" = mean 0 / std 1 in each latent channel
    # (as Wan's VAE); "global" = one shift and scale for all channels (VAEs before this key).
    scaling: Literal["channel", "global"] = "channel"
    # Fine-tuning: start from a saved VAE (its config replaces `model`: architecture and latent
    # scaling). freeze_encoder trains the decoder alone, so the latents and their scaling stay
    # those of `init` and a DiT trained on them stays valid (the scaling is not refitted).
    init: str = ""
    freeze_encoder: bool = False

    def validate(self) -> None:
        if min(self.steps, self.log_every, self.checkpoint_every) < 1:
            raise ValueError("steps, log_every and checkpoint_every: must be >= 1")
        if self.freeze_encoder and not self.init:
            raise ValueError("freeze_encoder: needs init (the VAE whose encoder to keep)")
        t, s = self.model.temporal_factor, self.model.spatial_factor
        d = self.data
        for frames, size in [(d.crop_frames, d.crop_size),
                             *((st.crop_frames, st.crop_size) for st in d.stages)]:
            if (frames - 1) % t or size % s:
                raise ValueError(f"data.crop_frames must be 1 + {t}k and data.crop_size a "
                                 f"multiple of {s} (the model's factors), in data.stages too; "
                                 f"got {frames}, {size}")
        if sum(st.steps for st in d.stages) >= self.steps:
            raise ValueError(f"data.stages last {sum(st.steps for st in d.stages)} steps, not "
                             f"fewer than steps={self.steps}: nothing is left for the main crops")


def with_init(cfg: VAETrainLoopConfig) -> VAETrainLoopConfig:
    """`cfg` with `model` read from the `init` VAE, if any (architecture and latent scaling)."""
    if not cfg.init:
        return cfg
    try:
        config = read_vae_config(cfg.init)  # the header: no tensor is read
    except (OSError, ValueError) as e:
        raise ValueError(f"init: {e}") from None
    return replace(cfg, model=config)


def initial_vae(cfg: VAETrainLoopConfig) -> VideoVAE:
    """The model training starts from: fresh, or `init`'s weights (encoder frozen on request)."""
    model = VideoVAE(replace(cfg.model))
    if cfg.init:  # cfg.model is init's own config (with_init, in the drivers)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cfg.init))
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


def center_crops(clips: list[np.ndarray], crop: tuple[int, int, int]) -> torch.Tensor:
    """uint8 clips (T, H, W, 3) at least `crop` big -> float (N, 3, t, h, w) in [-1, 1]."""
    ct, ch, cw = crop
    out = []
    for c in clips:
        T, H, W, _ = c.shape
        t0, y0, x0 = (T - ct) // 2, (H - ch) // 2, (W - cw) // 2
        out.append(torch.from_numpy(np.array(c[t0:t0 + ct, y0:y0 + ch, x0:x0 + cw])))
    return to_video(torch.stack(out))


def loss_and_stats(cfg: VAETrainLoopConfig, x: torch.Tensor, recon: torch.Tensor,
                   posterior: Any) -> tuple[torch.Tensor, dict[str, float]]:
    loss, stats = vae_loss(x, recon, posterior, cfg.loss.kl_weight, cfg.loss.grad_weight)
    mse = F.mse_loss(recon, x)
    if cfg.loss.mse_weight:
        loss = loss + cfg.loss.mse_weight * mse
    return loss, {"loss": loss.item(), "l1": stats["l1"], "kl": stats["kl"],
                  "mse": F.mse_loss(recon.detach().clamp(-1, 1), x).item()}


@torch.no_grad()
def validate(cfg: VAETrainLoopConfig, model: VideoVAE, val: torch.Tensor,
             device: torch.device) -> dict[str, float]:
    """Loss terms and PSNR on the held-out crops; the posterior mean, no sampling noise."""
    model.eval()
    sums: dict[str, float] = {}
    for lo in range(0, len(val), cfg.data.batch_size):
        x = val[lo:lo + cfg.data.batch_size].to(device)
        posterior = model.encode_posterior(x)
        _, stats = loss_and_stats(cfg, x, model.decode_raw(posterior.mode()), posterior)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v * len(x)
    model.train()
    out = {k: v / len(val) for k, v in sums.items()}
    return {**out, "psnr": psnr_from_mse(out["mse"], peak=2.0)}


def ema_model(cfg: VAETrainLoopConfig, ema: EMA, device: torch.device) -> VideoVAE:
    model = VideoVAE(replace(cfg.model)).to(device)
    model.load_state_dict({k: v.to(device) for k, v in ema.full_state(frozen=True).items()})
    return model


def export_vae(cfg: VAETrainLoopConfig, ema: EMA, buffer: ClipBuffer, device: torch.device,
               folder: Path) -> None:
    """`folder`/vae.safetensors: the EMA weights, the latent scaling (`cfg.scaling`) fitted on
    training crops (fixed generator; not with a frozen encoder, whose latents keep `init`'s
    scaling), written whole in `export_dtype` (load_vae casts back to float32)."""
    model = ema_model(cfg, ema, device)
    if len(buffer) and not cfg.freeze_encoder:
        g = torch.Generator().manual_seed(cfg.seed)
        crops = buffer.sample(4 * cfg.data.batch_size, False, g)
        model.fit_scaling((x.to(device) for x in crops.split(cfg.data.batch_size)),
                          per_channel=cfg.scaling == "channel")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "vae.safetensors.tmp"
    save_vae(model.to(torch_dtype(cfg.export_dtype)), tmp)
    tmp.replace(folder / "vae.safetensors")


def crops(cfg: VAETrainLoopConfig, buffer: ClipBuffer, step: int, rank: int,
          device: torch.device) -> tuple[torch.Tensor, float]:
    """This worker's crops of `step` (n, 3, T, H, W) and their weight: 0 when its buffer is
    empty (zeros that keep the ranks in lockstep). Seeds the default generator by (seed, step,
    rank) for the crops here and the posterior noise of the forward."""
    torch.manual_seed(sample_seed(cfg.seed, step, rank))
    frames, size, batch = cfg.data.crop_at(step)
    if not len(buffer):
        return torch.zeros(batch, 3, frames, size, size).to(device), 0.0
    crop = (frames, size, size)
    return buffer.sample(batch, cfg.data.flip, torch.default_generator, crop).to(device), 1.0


def train_row(step: int, stats: dict[str, float], weight: float, total: torch.Tensor,
              x: torch.Tensor, buffer: ClipBuffer, device: torch.device, *, lr: float,
              grad_norm: float, t0: float, data_s: float) -> dict[str, Any]:
    """The step's metrics.jsonl row: loss terms averaged over the workers with crops (`total`),
    samples and clips seen summed over all (one collective), time and throughput."""
    batch, frames = x.shape[0], x.shape[2]
    *terms, samples, seen = reduce_sum([stats[k] * weight for k in ("loss", "l1", "kl", "mse")]
                                       + [weight * batch, float(buffer.seen)], device).tolist()
    loss, l1, kl, mse = (s / max(total.item(), 1.0) for s in terms)
    dt = elapsed(t0, device)
    return {"split": "train", "step": step, "loss": loss, "l1": l1, "kl": kl,
            "psnr": psnr_from_mse(mse, peak=2.0), "lr": lr, "grad_norm": grad_norm,
            "samples": int(samples), "frames_per_s": samples * frames / dt, "step_s": dt,
            "crop_frames": frames, "data_s": data_s, "buffer_clips": len(buffer),
            "clips_seen": int(seen), "memory_mb": memory_mb(device), "time": time.time()}


def log_validation(cfg: VAETrainLoopConfig, ema: EMA, val: torch.Tensor, log: MetricsLog,
                   step: int, device: torch.device) -> None:
    """The weights that get exported (the EMA) on the held-out crops: a val row and a line."""
    t0 = time.perf_counter()
    stats = validate(cfg, ema_model(cfg, ema, device), val, device)
    log.write({"split": "val", "step": step, **stats, "clips": len(val),
               "val_s": time.perf_counter() - t0})
    say(f"[train-vae] step {step} val loss {stats['loss']:.4f} psnr {stats['psnr']:.2f} dB "
        f"({len(val)} held-out crops)")


def train_vae_loop(cfg: VAETrainLoopConfig, backend: Backend,
                   source: Callable[[], Iterator[pa.Table]], run_dir: Path | Any,
                   resolved: dict[str, Any], val: torch.Tensor | None = None) -> dict[str, Any]:
    """Train until `cfg.steps`. `source()` starts one pass over this worker's decoded clips
    (Arrow blocks with `frames` + `frames_shape`); `val` holds the held-out crops."""
    folder = RunFolder(run_dir)  # an object-store RUN: staged here, uploaded by sync
    rank, W, device, run_dir = backend.rank, backend.world_size, backend.device, folder.local
    with process_group(device):
        run_dir.mkdir(parents=True, exist_ok=True)
        state = train_state(  # the same init on every rank (DDP also broadcasts it)
            lambda: initial_vae(cfg).to(device), cfg.optim, cfg.seed, backend, "train-vae",
            wrap=lambda m: DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None))
        start = step = state.start
        if rank == 0:
            folder.pull("metrics.jsonl")  # a resumed object-store run's lines so far
        log = MetricsLog(run_dir, start, rank == 0)
        clips = ClipStream(cfg.data, source, backend, cfg.seed)
        # rank 0 validates and writes the VAE (each checkpoint also holds a loadable one)
        val = val if rank == 0 and val is not None and len(val) else None
        export = partial(export_vae, cfg, state.ema, clips.buffer, device) if rank == 0 else None
        if start == 0 and val is not None:
            log_validation(cfg, state.ema, val, log, 0, device)
        progress = Progress("train-vae", start, cfg.steps, cfg.log_every, rank == 0)
        row: dict[str, Any] = {}
        while step < cfg.steps:
            t0 = time.perf_counter()
            clips.ready(device)
            x, weight = crops(cfg, clips.buffer, step, rank, device)
            t_data = time.perf_counter() - t0

            lr = cfg.optim.lr_at(step, cfg.steps)
            set_lr(state.optim, lr)
            total = reduce_sum([weight], device)  # workers with crops this step
            recon, posterior = state.model(x)
            loss, stats = loss_and_stats(cfg, x, recon, posterior)
            grad_norm = optimizer_step(state, loss * weight, total, W, cfg.optim.grad_clip)
            step += 1

            row = train_row(step, stats, weight, total, x, clips.buffer, device, lr=lr,
                            grad_norm=grad_norm, t0=t0, data_s=t_data)
            log.write(row)
            progress(step, f"loss {row['loss']:.4f} psnr {row['psnr']:.2f} lr {lr:.2e} "
                           f"gnorm {grad_norm:.3f} {row['frames_per_s']:.0f} frames/s buffer "
                           f"{row['buffer_clips']} clips (seen {row['clips_seen']})")
            if val is not None and due(step, cfg.data.val_every, cfg.steps):
                log_validation(cfg, state.ema, val, log, step, device)
            if due(step, cfg.checkpoint_every, cfg.steps):
                if rank == 0:
                    folder.sync("metrics.jsonl")
                state.save(backend, step, row, resolved, extra=export)
        if export is not None:
            export(run_dir / "export")
            (run_dir / "export" / "train.json").write_text(json.dumps(
                {"step": step, "config": resolved}, indent=2, default=str))
            folder.sync("metrics.jsonl", "export")
    return {"step": step, "start": start, "last": row, "too_small": clips.buffer.too_small}


def local_source(tables: list[pa.Table]) -> Callable[[], Iterator[pa.Table]]:
    """Clip blocks already in this process (tests, benchmarks): one pass per call."""
    return lambda: iter(list(tables))


def ray_worker(args: dict[str, Any]) -> None:
    """A Ray Train worker of `tubelet train-vae` (pipeline/train_vae.py passes it to the
    TorchTrainer). `args`: cfg (the TrainVAEConfig), run, resolved, val (held-out crops)."""
    import ray.train

    cfg = args["cfg"]
    with ray_backend(cfg.worker.torch_threads()) as backend:
        shard = ray.train.get_dataset_shard("train")

        def source() -> Iterator[pa.Table]:
            return shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=cfg.data.prefetch_batches)

        train_vae_loop(cfg, backend, source, args["run"], args["resolved"], args["val"])
