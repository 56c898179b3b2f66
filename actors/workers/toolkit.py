"""The training toolkit both trainers use (`train_dit.py`, `train_vae.py`): small functions, not
a framework. Each trainer keeps its own loop and calls these in it:

- who am I, where do checkpoints go: `Backend` (`LocalBackend`: one process, no Ray;
  `RayBackend`: inside a Ray Train worker, entered with `ray_backend`);
- `process_group()`: a 1-rank gloo group when none exists, so one process runs the same
  FSDP / DDP code path as a cluster;
- `train_state(...)`: seed -> model -> optimizer -> EMA -> restore -> start step, and
  `TrainState.save` for the sharded checkpoint;
- one step: `set_lr`, `optimizer_step` (weighted backward, clip, step, EMA), `reduce_sum`
  (flags, weights and metrics summed over the workers);
- what a run prints and writes: `say`, `Progress`, `MetricsLog`, `memory_mb`, and when:
  `due` (every N steps and at the last), `elapsed` (a step's time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from actors.common.storage import Store, as_store
from actors.workers.checkpoints import EMA, load_checkpoint, save_checkpoint


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


# ---------------------------------------------------------------------------------------------
# Backends: the worker logic runs without Ray (vLLM's executor split)


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
        self.stack = ExitStack()  # holds the restored checkpoint's folder open

    def restore_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return Path(self.stack.enter_context(ckpt.as_directory())) if ckpt else None

    def checkpoint(self, step: int, save: Callable[[Path], None], metrics: dict) -> None:
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix=f"tubelet-ckpt-{step}-"))
        try:
            save(tmp)
            ray.train.report({"step": step, "loss": metrics["loss"]},
                             checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"step_{step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def quiet_ray_data_console() -> None:
    """Ray Data's console lines (its issue detectors' multi-line memory warnings, operator
    progress) at ERROR only, in this process; its session log file (ray-data.log) keeps
    everything. Called by the driver and by every Train worker that streams a dataset."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers, which we then quiet

    for h in logging.getLogger("ray.data").handlers:
        if "File" not in type(h).__name__:
            h.setLevel(logging.ERROR)


@contextmanager
def ray_backend(threads: int) -> Iterator[RayBackend]:
    """The start of every Ray Train worker function: this worker's backend, `threads` torch
    threads on a CPU worker (a worker must not take more cores than Ray gave it)."""
    backend = RayBackend()
    quiet_ray_data_console()
    if backend.device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield backend
    finally:
        backend.stack.close()


@contextmanager
def process_group(device: torch.device | None = None) -> Iterator[None]:
    """The default process group for FSDP / DDP: Ray Train's when it made one, else a 1-rank
    group for the duration (so one process runs the same code path as a cluster): NCCL for a
    CUDA `device` (FSDP2 gathers device tensors; gloo has no CUDA all-gather), else gloo."""
    own = not dist.is_initialized()
    if own:
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device.index or 0)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        yield
    finally:
        if own:
            dist.destroy_process_group()


class RunFolder:
    """A run folder as a worker writes it: the folder itself when local; for an object-store
    RUN (a Store), a local staging folder whose files `sync` uploads, each whole (one PUT),
    and `pull` fetches back (a resumed run's metrics). Ray Train writes the checkpoints
    through the store's filesystem itself."""

    def __init__(self, run: Path | Store):
        self.store = as_store(run)
        self.local = (Path(tempfile.mkdtemp(prefix="tubelet-run-")) if self.store.remote
                      else Path(self.store.path))

    def pull(self, name: str) -> None:
        remote = self.store.child(*Path(name).parts)
        if self.store.remote and remote.is_file():
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            (self.local / name).write_bytes(remote.read_bytes())

    def sync(self, *names: str) -> None:
        """Upload `names` (files, or folders: every file below) of the staging folder."""
        if not self.store.remote:
            return
        for name in names:
            path = self.local / name
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
                [path] if path.is_file() else [])
            self.store.put_files(self.local, files)


def record_worker(run_dir: Path, backend: Backend) -> None:
    """RUN/workers/rank<r>.json: which process and host ran this rank (for post-mortems)."""
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank{backend.rank}.json").write_text(json.dumps(
        {"rank": backend.rank, "world_size": backend.world_size, "pid": os.getpid(),
         "host": socket.gethostname(), "started": time.time()}))


# ---------------------------------------------------------------------------------------------
# Model, optimizer, EMA, restore


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    # foreach: one multi-tensor kernel per update, not a loop over the (DTensor) parameters;
    # torch picks it by itself only on CUDA (measured on CPU below, optimizer_step)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


@dataclass
class TrainState:
    """What a checkpoint holds: `model` (the module the loop calls, maybe a DDP wrapper of
    `module`), its optimizer and EMA, and the step to start from."""

    module: nn.Module
    model: nn.Module
    optim: torch.optim.Optimizer
    ema: EMA
    start: int = 0

    def save(self, backend: Backend, step: int, metrics: dict[str, Any],
             resolved: dict[str, Any], fingerprint: str = "",
             extra: Callable[[Path], None] | None = None) -> None:
        """A sharded checkpoint at `step` (a collective: every rank calls it); `extra(path)`
        adds files to the checkpoint folder (e.g. the VAE's loadable vae.safetensors)."""
        train = {"step": step, "data_fingerprint": fingerprint,
                 "world_size": backend.world_size}

        def write(path: Path) -> None:
            save_checkpoint(path, self.model, self.optim, self.ema, train, resolved)
            if extra is not None:
                extra(path)

        backend.checkpoint(step, write, metrics)


def train_state(make: Callable[[], nn.Module], optim: OptimConfig, seed: int, backend: Backend,
                tag: str, wrap: Callable[[nn.Module], nn.Module] | None = None,
                fingerprint: str = "") -> TrainState:
    """Seed -> `make()` -> AdamW -> EMA -> `wrap` (DDP) -> restore the backend's checkpoint.

    The seed comes first so that every rank builds identical weights before sharding.
    The optimizer and EMA see `make()`'s module (EMA names without a DDP `module.` prefix);
    the checkpoint loads through the wrapped model. `fingerprint`: the data plan's; a
    checkpoint of another plan resumes with a warning (the data order is not the original)."""
    torch.manual_seed(seed)
    module = make()
    opt = build_optimizer(module, optim)
    ema = EMA(module, optim.ema_decay)
    state = TrainState(module, wrap(module) if wrap else module, opt, ema)
    restored = backend.restore_dir()
    if restored is not None:
        train = load_checkpoint(restored, state.model, opt, ema)
        state.start = int(train["step"])
        if backend.rank == 0:
            if fingerprint and train["data_fingerprint"] not in ("", fingerprint):
                say(f"[{tag}] warning: the dataset changed since {restored.name}; "
                    "the data order after resume is not the original one")
            say(f"[{tag}] resumed from {restored} at step {state.start}")
    return state


# ---------------------------------------------------------------------------------------------
# One step


def set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    for group in optim.param_groups:
        group["lr"] = lr


def reduce_sum(values: torch.Tensor | Sequence[float],
               device: torch.device | None = None) -> torch.Tensor:
    """Sum over all workers (a collective: every rank calls it, in the same order). A list
    becomes a float32 tensor on `device` first (gloo on CPU, NCCL on GPU: device tensors)."""
    t = values if torch.is_tensor(values) else torch.tensor(list(values), device=device)
    dist.all_reduce(t)
    return t


def optimizer_step(state: TrainState, weighted_loss: torch.Tensor, total_weight: torch.Tensor,
                   world_size: int, grad_clip: float) -> float:
    """Backward of this worker's weighted loss sum, clip, AdamW step, EMA update; the global
    grad norm (before clipping).

    `total_weight` is the weight summed over all workers. FSDP and DDP average gradients over
    the `world_size` workers, so scaling by W / total makes the result the gradient of the
    global weighted mean, whatever the split; a zero-weight worker still takes part (its
    gradient is zero) so the collectives pair up."""
    (weighted_loss * world_size / total_weight.reshape(-1)[0].clamp(min=1e-12)).backward()
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                          grad_clip if grad_clip > 0 else float("inf"),
                                          foreach=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP
    state.optim.step()
    state.optim.zero_grad(set_to_none=True)
    state.ema.update()
    return float(norm)


# ---------------------------------------------------------------------------------------------
# What a run prints and writes


def say(message: str) -> None:
    """A progress line. Not print(): Ray Train tees print to a logger, so it shows twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def sample_seed(seed: int, step: int, slot: int) -> int:
    """A seed for one sample (or one rank) of one step: independent streams per (seed, step,
    slot), so draws do not depend on batching or worker count."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0] >> 1)


def due(step: int, every: int, total: int) -> bool:
    """Whether step `step` (1-based: steps done) is one of every `every`, or the last."""
    return step % every == 0 or step == total


def elapsed(t0: float, device: torch.device) -> float:
    """Seconds since `t0` once the GPU's queued work is done (else a step times its launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


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


class Progress:
    """The progress line (rank 0, every `every` steps and at the last):
    `[tag] step S/TOTAL <the trainer's fields> eta Ns`, the eta from this run's pace."""

    def __init__(self, tag: str, start: int, total: int, every: int, enabled: bool):
        self.tag, self.start, self.total, self.every = tag, start, total, every
        self.enabled, self.t0 = enabled, time.perf_counter()

    def line(self, step: int, fields: str) -> str:
        eta = (time.perf_counter() - self.t0) / (step - self.start) * (self.total - step)
        return f"[{self.tag}] step {step}/{self.total} {fields} eta {eta:.0f}s"

    def __call__(self, step: int, fields: str) -> None:
        if self.enabled and due(step, self.every, self.total):
            say(self.line(step, fields))
