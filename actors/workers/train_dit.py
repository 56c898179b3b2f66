"""The per-worker training loop. Runs without Ray: a `Backend` says who this worker is, where
checkpoints go and how they are reported (Ray Train is one backend, in pipeline/train.py;
`LocalBackend` here runs one process, as tests and debugging do).

One step, on every worker (all run the same number of steps: FSDP meets in collectives):
  batch  <- this worker's slice of the step's global batch (actors/workers/train_data.py)
  noise, t, drop_text <- one generator per sample, seeded by (seed, step, slot): the same
            draws whatever the number of workers
  loss   = sum_i w_i * |v_theta(x_t, t, text) - (noise - x0)|^2 / sum_i w_i over the *global*
           batch (w = 0 for padding); each worker scales its partial sum by W / sum(w) because
           FSDP averages gradients over the W workers
  AdamW step with warmup + schedule, gradient clipping, EMA update.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist

from actors.workers.checkpoints import EMA, export_ema, load_checkpoint, save_checkpoint
from actors.workers.parallelize import ParallelConfig, parallelize
from actors.workers.train_data import StepBatch, TrainDataConfig
from models.denoiser import Denoiser
from models.dit import DiTConfig, dit_debug
from models.flow import FlowConfig, interpolate, shift_timesteps
from models.patching import PatchGrid
from models.text_encoder import ByteTokenizer, TextEncoderConfig, text_encoder_debug


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0  # applied to matrices only (not biases, norms, null text)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear from 0
    schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.999

    def validate(self) -> None:
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr and eps must be > 0, weight_decay and grad_clip >= 0")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")

    def lr_at(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio)
                          * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


@dataclass
class TrainLoopConfig:
    """What one worker needs. `tubelet train`'s TrainConfig extends it with cluster settings."""

    model: DiTConfig = field(default_factory=dit_debug)
    text_encoder: TextEncoderConfig = field(default_factory=text_encoder_debug)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 1000  # optimizer steps in all (epochs follow from the dataset size)
    seed: int = 0  # model init and per-sample noise
    log_every: int = 10  # progress line every N steps (metrics.jsonl gets every step)
    checkpoint_every: int = 500  # sharded checkpoint every N steps, and at the end

    def validate(self) -> None:
        if min(self.steps, self.log_every, self.checkpoint_every) < 1:
            raise ValueError("steps, log_every and checkpoint_every: must be >= 1")
        if self.model.text_dim != self.text_encoder.dim:
            raise ValueError(f"model.text_dim ({self.model.text_dim}) must equal "
                             f"text_encoder.dim ({self.text_encoder.dim})")
        if self.model.grad_checkpointing:
            raise ValueError("model.grad_checkpointing: set parallel.activation_checkpointing")


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def restore_dir(self) -> Path | None: ...  # checkpoint to resume from, if any

    def checkpoint(self, step: int, save: Callable[[Path], None], metrics: dict) -> None: ...


class LocalBackend:
    """One process, no Ray: checkpoints go straight to RUN/checkpoints/step_N."""

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, device: str = "cpu"):
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.device = torch.device(device)

    def restore_dir(self) -> Path | None:
        done = sorted(p for p in self.ckpt_dir.glob("step_*")
                      if p.suffix != ".tmp" and (p / ".metadata").is_file())
        return done[-1] if done else None

    def checkpoint(self, step: int, save: Callable[[Path], None], metrics: dict) -> None:
        final = self.ckpt_dir / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        save(tmp)
        tmp.replace(final)  # whole or absent


class RayBackend:
    """Checkpoints through `ray.train.report` (each rank writes its shards to a temp folder;
    Ray merges them into RUN/checkpoints/step_N); resume from `ray.train.get_checkpoint`."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.stack = ExitStack()

    def restore_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return Path(self.stack.enter_context(ckpt.as_directory())) if ckpt else None

    def checkpoint(self, step: int, save, metrics: dict) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"tubelet-ckpt-{step}-"))
        try:
            save(tmp)
            ray.train.report({"step": step, "loss": metrics["loss"]},
                             checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step_{step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def say(message: str) -> None:
    """A progress line. Not print(): Ray Train tees print to a logger, so it shows twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def sample_seed(seed: int, step: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0] >> 1)


def draw(batch: StepBatch, cfg: TrainLoopConfig) -> tuple[torch.Tensor, ...]:
    """Noise, flow time and text drop for each sample, from that sample's own generator."""
    x = batch.x
    num_tokens = PatchGrid(tuple(x.shape[2:]), cfg.model.patch).num_tokens
    noise, z, u = [], [], []
    for slot in batch.slot:
        g = torch.Generator(device=x.device).manual_seed(sample_seed(cfg.seed, batch.step, slot))
        noise.append(torch.randn(x.shape[1:], generator=g, device=x.device))
        z.append(torch.randn(1, generator=g, device=x.device))
        u.append(torch.rand(1, generator=g, device=x.device))
    f = cfg.flow
    t = shift_timesteps(torch.sigmoid(f.logit_mean + f.logit_std * torch.cat(z)),
                        f.shift(num_tokens))  # logit-normal, resolution-shifted (models.flow)
    return torch.stack(noise), t, torch.cat(u) < cfg.model.text_dropout


def empty_batch(cfg: TrainLoopConfig) -> StepBatch:
    """A zero-weight batch of one patch of zeros, for a worker whose stream had no rows."""
    ids, mask = ByteTokenizer(cfg.text_encoder.max_len)([""])
    return StepBatch(step=-1, bucket="", ids=[""], fps=torch.ones(1), text_ids=ids,
                     text_mask=mask, x=torch.zeros(1, cfg.model.in_channels, *cfg.model.patch),
                     weight=torch.zeros(1), slot=[0])


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsLog:
    """RUN/metrics.jsonl (rank 0): one JSON line per step. On resume, lines past the
    checkpoint's step (written after it, then lost with the crash) are dropped first."""

    def __init__(self, run_dir: Path, start: int, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def train_loop(cfg: TrainLoopConfig, backend: Backend, batches: Callable[[int], Iterator],
               run_dir: Path, resolved: dict[str, Any], fingerprint: str = "",
               stream: bool = False) -> dict[str, Any]:
    """Train until `cfg.steps`. `batches(start)` yields this worker's StepBatch of each step from
    `start` (and ends with the data); `stream=True`: a finished pass starts a new epoch."""
    run_dir, rank, W, device = Path(run_dir), backend.rank, backend.world_size, backend.device
    own_group = not dist.is_initialized()
    if own_group:  # one process: a 1-rank group, so the FSDP path is the same as on a cluster
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": W, "pid": os.getpid(), "host": socket.gethostname(),
         "started": time.time()}))
    torch.manual_seed(cfg.seed)  # identical init on every rank, before sharding
    model = parallelize(Denoiser(cfg.model, cfg.text_encoder), cfg.parallel, device)
    model.train()
    optim = build_optimizer(model, cfg.optim)
    ema = EMA(model, cfg.optim.ema_decay)
    start, restored = 0, backend.restore_dir()
    if restored is not None:
        train_state = load_checkpoint(restored, model, optim, ema)
        start = int(train_state["step"])
        if fingerprint and train_state["data_fingerprint"] not in ("", fingerprint) and rank == 0:
            say(f"[train] warning: the dataset changed since {restored.name}; "
                "the data order after resume is not the original one")
        if rank == 0:
            say(f"[train] resumed from {restored} at step {start}")
    log = MetricsLog(run_dir, start, rank == 0)

    def save(step: int, metrics: dict) -> None:
        train = {"step": step, "data_fingerprint": fingerprint, "world_size": W}
        backend.checkpoint(
            step, lambda p: save_checkpoint(p, model, optim, ema, train, resolved), metrics)

    it, step, dummy, epoch_start = batches(start), start, None, time.perf_counter()
    row: dict[str, Any] = {}
    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is not None and batch.step not in (-1, step):
            raise RuntimeError(f"data out of order: expected step {step}, got {batch.step}")
        flags = torch.tensor([float(batch is not None)], device=device)
        dist.all_reduce(flags)  # device tensors: gloo on CPU, NCCL on GPU
        if flags.item() == 0:  # every worker is out of data
            if not stream or step == start and dummy is None:
                raise RuntimeError(f"the data ran out at step {step} of {cfg.steps}")
            it = batches(step)  # next epoch of the stream
            continue
        if batch is None:  # this worker ran out first: a zero-weight step keeps FSDP in step
            batch = dummy or empty_batch(cfg)
        if batch.x.shape[1] != cfg.model.in_channels:
            raise ValueError(f"latents of bucket {batch.bucket!r} have {batch.x.shape[1]} "
                             f"channels, model.in_channels is {cfg.model.in_channels}")
        batch = replace(batch, step=step)  # stream batches carry no step of their own
        dummy = replace(batch, weight=torch.zeros_like(batch.weight))
        batch = batch.to(device)
        t_data = time.perf_counter() - t0

        lr = cfg.optim.lr_at(step, cfg.steps)
        for group in optim.param_groups:
            group["lr"] = lr
        noise, t, drop = draw(batch, cfg)
        total_w = batch.weight.sum().reshape(1)
        dist.all_reduce(total_w)  # sum of weights over the global batch
        pred = model(interpolate(batch.x, noise, t), t, batch.text_ids, batch.text_mask,
                     fps=batch.fps, drop_text=drop)
        per_sample = (pred.float() - (noise - batch.x)).square().flatten(1).mean(1)  # (B,)
        weighted = (per_sample * batch.weight).sum()
        (weighted * W / total_w[0].clamp(min=1e-12)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optim.step()
        optim.zero_grad(set_to_none=True)
        ema.update()
        step += 1

        n_tokens = PatchGrid(tuple(batch.x.shape[2:]), cfg.model.patch).num_tokens
        real = float((batch.weight > 0).sum())
        stats = torch.tensor([weighted.item(), real, real * n_tokens], device=device)
        dist.all_reduce(stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": stats[0].item() / max(total_w[0].item(), 1e-12), "lr": lr,
               "grad_norm": float(grad_norm), "bucket": batch.bucket,
               "samples": int(stats[1]), "tokens_per_s": stats[2].item() / dt,
               "tokens_per_s_per_worker": stats[2].item() / dt / W,
               "samples_per_s": stats[1].item() / dt, "step_s": dt, "data_s": t_data,
               "memory_mb": memory_mb(device), "time": time.time()}
        log.write(row)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            eta = (time.perf_counter() - epoch_start) / (step - start) * (cfg.steps - step)
            say(f"[train] step {step}/{cfg.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                f"gnorm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s "
                f"{row['samples_per_s']:.1f} samples/s data {t_data / dt:.0%} "
                f"mem {row['memory_mb']:.0f} MB eta {eta:.0f}s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step, row)
    export_ema(run_dir / "export", ema, model, resolved, step)  # collective: every rank
    if own_group:
        dist.destroy_process_group()
    return {"step": step, "start": start, "last": row}


def local_batches(loader, collate) -> Callable[[int], Iterator[StepBatch]]:
    """Data without Ray: step numbers -> `loader` (a PlanLoader) -> `collate`, in this process."""
    import pyarrow as pa

    def batches(start: int) -> Iterator[StepBatch]:
        step = start
        while True:
            yield collate(loader(pa.table({"step": [step]})))
            step += 1

    return batches
