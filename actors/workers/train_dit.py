"""The DiT trainer: the per-worker training loop. Runs without Ray: a `Backend` says who this
worker is, where checkpoints go and how they are reported (`ray_worker` below runs it in a Ray
Train worker; `LocalBackend` runs one process, as tests and debugging do). The pieces it
shares with the VAE trainer (process group, optimizer step, metrics, progress) are in
actors/workers/toolkit.py.

One step, on every worker (all run the same number of steps: FSDP meets in collectives):
  batch  <- this worker's slice of the step's global batch (actors/workers/train_data.py)
  noise, t, drop_text <- one generator per sample, seeded by (seed, step, slot): the same
            draws whatever the number of workers (t: `models.flow.sample_timesteps`)
  loss   = sum_i w_i * |v_theta(x_t, t, text) - (noise - x0)|^2 / sum_i w_i over the *global*
           batch (w = 0 for padding; `models.flow.flow_loss`); each worker scales its partial
           sum by W / sum(w) because FSDP averages gradients over the W workers
  AdamW step with warmup + schedule, gradient clipping, EMA update.

Text: the built-in encoder trains inside the model (byte tokens in). A pretrained one
(`text_encoder.pretrained`) is frozen and outside it: Collate tokenizes with its tokenizer,
the loop turns the tokens into features under no_grad and passes them as `text=`; it is
replicated on every worker in the DiT's compute dtype, and the export records its folder.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from actors.workers.checkpoints import export_ema
from actors.workers.parallelize import ParallelConfig, parallelize
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
    record_worker,
    reduce_sum,
    sample_seed,
    set_lr,
    train_state,
)
from actors.workers.train_data import Collate, StepBatch, TrainDataConfig, data_columns
from models.denoiser import Denoiser
from models.device import torch_dtype
from models.dit import DiTConfig, dit_debug
from models.finetune import FinetuneConfig
from models.flow import FlowConfig, flow_loss, sample_timesteps
from models.patching import PatchGrid
from models.text_encoder import (
    PretrainedTextEncoder,
    TextEncoderConfig,
    caption_tokenizer,
    text_encoder_debug,
    text_width,
)


@dataclass
class LatentsRecord:
    """The VAE that made the training latents and how it normalised them, set when training
    starts (from the latent dataset's preprocess record, or `preprocess.vae` with --input), not
    by hand. Generation decodes with that VAE and refuses one whose normalisation differs:
    decoding with other scaling gives wrong colours without any error."""

    vae: str = ""  # "" = not known (a dataset without its preprocess record)
    scaling_factor: list[float] = field(default_factory=list)  # one value, or one per channel
    shift_factor: list[float] = field(default_factory=list)


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
    log_every: int = 10  # progress line (and loss-map samples) every N steps; metrics.jsonl
    # gets every step
    checkpoint_every: int = 500  # sharded checkpoint every N steps, and at the end
    latents: LatentsRecord = field(default_factory=LatentsRecord)
    # `init` set: fine-tune that diffusers pipeline's transformer instead of the DiT (then
    # `model` and `text_encoder` are unused; actors/workers/finetune.py)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        if min(self.steps, self.log_every, self.checkpoint_every) < 1:
            raise ValueError("steps, log_every and checkpoint_every: must be >= 1")
        if self.finetune.init:  # the pipeline's own text encoder: checked against the data
            return
        enc = self.text_encoder
        width = text_width(enc)
        if self.model.text_dim != width:
            what = (f"the d_model of text_encoder.pretrained ({enc.pretrained})"
                    if enc.pretrained else "text_encoder.dim")
            raise ValueError(f"model.text_dim ({self.model.text_dim}) must equal {what} "
                             f"({width})")


def draw(batch: StepBatch, cfg: TrainLoopConfig, patch: tuple[int, int, int] | None = None,
         dropout: float | None = None) -> tuple[torch.Tensor, ...]:
    """Noise, flow time and text drop for each sample, from that sample's own generator (drawn
    in that order: noise, then t's normal, then the drop's uniform; resume depends on it).
    `patch` and `dropout`: the trained model's (default: the DiT's, cfg.model)."""
    x = batch.x
    patch = tuple(cfg.model.patch) if patch is None else patch
    dropout = cfg.model.text_dropout if dropout is None else dropout
    num_tokens = PatchGrid(tuple(x.shape[2:]), patch).num_tokens
    gens = [torch.Generator(device=x.device).manual_seed(sample_seed(cfg.seed, batch.step, slot))
            for slot in batch.slot]
    noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in gens])
    t = sample_timesteps(len(gens), cfg.flow, num_tokens, x.device, generator=gens)
    u = torch.cat([torch.rand(1, generator=g, device=x.device) for g in gens])
    return noise, t, u < dropout


def empty_batch(cfg: TrainLoopConfig) -> StepBatch:
    """A zero-weight batch of one patch of zeros, for a worker whose stream had no rows."""
    ids, mask = caption_tokenizer(cfg.text_encoder)([""])
    return StepBatch(step=-1, bucket="", ids=[""], fps=torch.ones(1), text_ids=ids,
                     text_mask=mask, x=torch.zeros(1, cfg.model.in_channels, *cfg.model.patch),
                     weight=torch.zeros(1), slot=[0])


def frozen_text_encoder(cfg: TrainLoopConfig,
                        device: torch.device) -> PretrainedTextEncoder | None:
    """The pretrained encoder on `device` in the DiT's compute dtype; None: the built-in one."""
    if not cfg.text_encoder.pretrained:
        return None
    return PretrainedTextEncoder(cfg.text_encoder.pretrained, cfg.text_encoder.max_len,
                                 torch_dtype(cfg.parallel.param_dtype)).to(device)


def text_inputs(batch: StepBatch, frozen: PretrainedTextEncoder | None) -> dict[str, Any]:
    """The model's text arguments: tokens for the built-in encoder, else frozen features."""
    if frozen is None:
        return {"text_ids": batch.text_ids, "text_mask": batch.text_mask}
    return {"text": frozen(batch.text_ids, batch.text_mask), "text_mask": batch.text_mask}


class DiTTrainee:
    """What the loop trains by default: tubelet's DiT with its text encoder (`Denoiser`),
    sharded by `parallelize`, exported by `export_ema`. The seam a pretrained transformer
    plugs into (actors/workers/finetune.py `PipelineTrainee`: the same attributes and methods).
    """

    def __init__(self, cfg: TrainLoopConfig):
        self.cfg = cfg
        self.in_channels, self.patch = cfg.model.in_channels, tuple(cfg.model.patch)
        self.text_dropout = cfg.model.text_dropout
        self.frozen: PretrainedTextEncoder | None = None

    def collate(self) -> Collate:
        return Collate(caption_tokenizer(self.cfg.text_encoder))

    def build(self, device: torch.device) -> torch.nn.Module:
        """The sharded model (called after the trainer seeds torch's generator)."""
        return parallelize(Denoiser(self.cfg.model, self.cfg.text_encoder), self.cfg.parallel,
                           device)

    def setup(self, device: torch.device) -> None:
        """What runs beside the trained model (before seeding): a frozen text encoder."""
        self.frozen = frozen_text_encoder(self.cfg, device)

    def inputs(self, batch: StepBatch) -> dict[str, Any]:
        return text_inputs(batch, self.frozen)

    def empty_batch(self) -> StepBatch:
        return empty_batch(self.cfg)

    def export(self, out: Path, ema: Any, model: torch.nn.Module, resolved: dict[str, Any],
               step: int) -> None:
        export_ema(out, ema, model, resolved, step, self.frozen)


def trainee_of(cfg: TrainLoopConfig) -> Any:
    """The model a config trains: a pipeline folder's transformer (`finetune.init`) or the DiT."""
    if cfg.finetune.init:
        from actors.workers.finetune import PipelineTrainee

        return PipelineTrainee(cfg)
    return DiTTrainee(cfg)


def train_loop(cfg: TrainLoopConfig, backend: Backend, batches: Callable[[int], Iterator],
               run_dir: Path | Any, resolved: dict[str, Any], fingerprint: str = "",
               stream: bool = False, trainee: Any = None) -> dict[str, Any]:
    """Train until `cfg.steps`. `batches(start)` yields this worker's StepBatch of each step from
    `start` (and ends with the data); `stream=True`: a finished pass starts a new epoch.
    `trainee`: what is trained (default `trainee_of(cfg)`)."""
    folder = RunFolder(run_dir)  # an object-store RUN: staged here, uploaded by sync
    run_dir, rank, W, device = folder.local, backend.rank, backend.world_size, backend.device
    trainee = trainee or trainee_of(cfg)
    with process_group(device):
        record_worker(run_dir, backend)
        folder.sync(f"workers/rank{rank}.json")
        trainee.setup(device)
        state = train_state(lambda: trainee.build(device), cfg.optim, cfg.seed, backend,
                            "train", fingerprint=fingerprint)
        model, start = state.model, state.start
        model.train()
        if rank == 0:
            folder.pull("metrics.jsonl")  # a resumed object-store run's lines so far
        log = MetricsLog(run_dir, start, rank == 0)
        it, step, dummy = batches(start), start, None
        progress = Progress("train", start, cfg.steps, cfg.log_every, rank == 0)
        row: dict[str, Any] = {}
        while step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is not None and batch.step not in (-1, step):
                raise RuntimeError(f"data out of order: expected step {step}, got {batch.step}")
            if reduce_sum([float(batch is not None)], device).item() == 0:  # all out of data
                if not stream or step == start and dummy is None:
                    raise RuntimeError(f"the data ran out at step {step} of {cfg.steps}")
                it = batches(step)  # next epoch of the stream
                continue
            if batch is None:  # this worker ran out first: a zero-weight step keeps FSDP in step
                batch = dummy or trainee.empty_batch()
            if batch.x.shape[1] != trainee.in_channels:
                raise ValueError(f"latents of bucket {batch.bucket!r} have {batch.x.shape[1]} "
                                 f"channels, the model takes {trainee.in_channels}")
            batch = replace(batch, step=step)  # stream batches carry no step of their own
            dummy = replace(batch, weight=torch.zeros_like(batch.weight))
            batch = batch.to(device)
            t_data = time.perf_counter() - t0

            lr = cfg.optim.lr_at(step, cfg.steps)
            set_lr(state.optim, lr)
            noise, t, drop = draw(batch, cfg, trainee.patch, trainee.text_dropout)
            total_w = reduce_sum(batch.weight.sum().reshape(1))  # over the global batch
            # the loss map's per-frame errors, only on the steps that log them
            frames: list[torch.Tensor] | None = [] if (step + 1) % cfg.log_every == 0 else None
            weighted = flow_loss(model, batch.x, t, noise, weight=batch.weight, frames=frames,
                                 fps=batch.fps, drop_text=drop, **trainee.inputs(batch))
            grad_norm = optimizer_step(state, weighted, total_w, W, cfg.optim.grad_clip)
            step += 1

            n_tokens = PatchGrid(tuple(batch.x.shape[2:]), trainee.patch).num_tokens
            real = float((batch.weight > 0).sum())
            loss_sum, samples, tokens = reduce_sum(
                [weighted.item(), real, real * n_tokens], device).tolist()
            dt = elapsed(t0, device)
            row = {"step": step, "loss": loss_sum / max(total_w[0].item(), 1e-12), "lr": lr,
                   "grad_norm": grad_norm, "bucket": batch.bucket, "samples": int(samples),
                   "tokens_per_s": tokens / dt, "tokens_per_s_per_worker": tokens / dt / W,
                   "samples_per_s": samples / dt, "step_s": dt, "data_s": t_data,
                   "memory_mb": memory_mb(device), "time": time.time()}
            if frames:  # the loss map (benchmarks/loss_map.py): this
                real_rows = batch.weight > 0  # worker's samples' flow time, MSE per frame
                row["t"] = [round(v, 4) for v in t[real_rows].tolist()]
                row["frame_loss"] = [[round(v, 5) for v in r]
                                     for r in frames[0][real_rows].tolist()]
            log.write(row)
            progress(step, f"loss {row['loss']:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
                           f"{row['tokens_per_s']:.0f} tok/s {row['samples_per_s']:.1f} "
                           f"samples/s data {t_data / dt:.0%} mem {row['memory_mb']:.0f} MB")
            if due(step, cfg.checkpoint_every, cfg.steps):
                if rank == 0:
                    folder.sync("metrics.jsonl")
                state.save(backend, step, row, resolved, fingerprint)
                if step < cfg.steps:  # a long run can be sampled while it trains
                    trainee.export(run_dir / "export", state.ema, model, resolved, step)
                    folder.sync("export")
            elif rank == 0 and due(step, cfg.log_every, cfg.steps):
                folder.sync("metrics.jsonl")
        trainee.export(run_dir / "export", state.ema, model, resolved, step)  # every rank
        if rank == 0:
            folder.sync("metrics.jsonl", "export")
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


def prefetched(batches: Callable[[int], Iterator[StepBatch]], ahead: int, end: int
               ) -> Callable[[int], Iterator[StepBatch]]:
    """`batches` run `ahead` steps ahead in a thread (Parquet reads release the GIL), up to
    step `end`; an error in the thread is raised where the batch was expected."""
    def run(start: int) -> Iterator[StepBatch]:
        q: queue.Queue = queue.Queue(maxsize=ahead)
        stop = threading.Event()

        def fill() -> None:
            try:
                for _, batch in zip(range(start, end), batches(start), strict=False):
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)

        threading.Thread(target=fill, daemon=True, name="tubelet-prefetch").start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    return run


def ray_worker(args: dict[str, Any]) -> None:
    """A Ray Train worker of `tubelet train` (pipeline/train.py passes it to the TorchTrainer).
    `args`: cfg (the TrainConfig), run, resolved, fingerprint, stream (True: one pipelined
    stream split across the workers; False: this rank's planned dataset `rank<r>`)."""
    import ray.train

    from actors.workers.train_data import PlanLoader, planned_batches, streamed_batches

    cfg = args["cfg"]
    with ray_backend(cfg.worker.torch_threads()) as backend:
        trainee = trainee_of(cfg)
        collate = trainee.collate()
        r, W = backend.rank, backend.world_size
        if args["stream"]:
            batches = streamed_batches(ray.train.get_dataset_shard("train"), collate, cfg.data,
                                       r, W)
        elif cfg.data.loader == "worker":  # this rank's planned rows, read right here
            loader = PlanLoader(args["index"], cfg.data, W, r, columns=data_columns(cfg),
                                fs=args.get("data_fs"))
            batches = prefetched(local_batches(loader, collate), cfg.data.prefetch_steps,
                                 cfg.steps)
        else:
            batches = planned_batches(ray.train.get_dataset_shard(f"rank{r}"), collate,
                                      cfg.data.prefetch_steps)
        train_loop(cfg, backend, batches, args["run"], args["resolved"],
                   args["fingerprint"], stream=args["stream"], trainee=trainee)
