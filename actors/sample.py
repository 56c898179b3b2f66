"""Stage: text features + settings -> latents, by the DiT sampler (rectified-flow Euler with
classifier-free guidance), or by a diffusers pipeline folder's transformer and scheduler
(actors/workers/pipeline_sampler.py: the latents the pipeline itself gives).

Each actor of the pool owns a `SamplerGroup` (actors/workers/sampler.py): one process, or a
group of K sequence-parallel ranks (x2 with CFG parallel) that this actor leads. Rows are
grouped by shape and settings (height, width, frames, steps, cfg, with/without a negative
prompt) so that every forward has one shape, and sampled up to `max_batch` at a time.

Noise: drawn from the row's own seed (`torch.Generator().manual_seed(seed)`, float32 on the
CPU, in the latent's shape), never from a process-wide generator, so a row's latents do not
depend on the batch it falls in, the actor that takes it, or the ranks' layout.

Reads the prompt row's settings and the text stage's features; writes `latent` (float32
(C, T, H, W) in the VAE's normalised space) and `sample_seconds`, and drops the features.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.schema import require_columns
from actors.common.stage import Companion, StageSpec
from actors.common.tensors import pack, unpack, with_columns

TEXT_COLUMNS = ("text", "text_shape", "text_len", "neg_text", "neg_text_shape", "neg_len")


def row_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The row's starting noise: its own generator, float32, CPU (bitwise the same anywhere)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def latent_shape(channels: int, frames: int, height: int, width: int, temporal: int,
                 spatial: int) -> tuple[int, int, int, int]:
    return (channels, 1 + (frames - 1) // temporal, height // spatial, width // spatial)


class SampleStage:
    SETTINGS = ("id", "seed", "height", "width", "frames", "fps", "steps", "cfg", "text_len",
                "neg_len")
    READS = SETTINGS + ("text", "text_shape", "neg_text", "neg_text_shape")
    WRITES = ("latent", "latent_shape", "sample_seconds")
    DROPS = TEXT_COLUMNS

    @classmethod
    def spec(cls, cfg: Any, export: str, temporal: int, spatial: int, gpus: bool,
             source: Any = None) -> StageSpec:
        """From a generate config: its `sampler:` section, `max_batch` and `sample` pool
        (one GPU per actor when the cluster has GPUs and the sampler may use them). A
        sequence-parallel sampler starts `world_size - 1` rank actors of its own per pool
        actor: the spec declares them, so the pool sizing counts them. `source`: the object
        store `export` was copied from (a node without the copy makes it)."""
        sample = cfg.sample
        if gpus and cfg.sampler.device in ("auto", "cuda") and sample.num_gpus == 0:
            sample = replace(sample, num_gpus=1)
        if not cfg.sampler.batch_invariant and sample.batch_size < cfg.max_batch:
            # packing needs the rows in one call: up to max_batch of them per forward
            sample = replace(sample, batch_size=cfg.max_batch)
        ranks = cfg.sampler.world_size - 1
        companions = (Companion(
            "sampler ranks", "sampler.num_cpus_per_rank", ranks, cfg.sampler.num_cpus_per_rank,
            1.0 if sample.num_gpus > 0 else 0.0, ("sampler", "num_cpus_per_rank")),
        ) if ranks else ()
        return StageSpec("sample", cls, dict(
            export=export, sampler=asdict(cfg.sampler), temporal=temporal, spatial=spatial,
            max_batch=cfg.max_batch, source=source), sample, companions)

    def __init__(self, export: str, sampler: dict, temporal: int, spatial: int,
                 max_batch: int = 4, source: Any = None):
        from actors.common.storage import ensure_local
        from actors.workers.sampler import SamplerConfig, SamplerGroup
        from models.export import model_kind, read_export

        ensure_local(export, source)

        self.group = self.pipeline = None
        self.temporal, self.spatial, self.max_batch = temporal, spatial, max_batch
        if model_kind(export) == "diffusers":  # the folder's transformer and scheduler
            from actors.workers.pipeline_sampler import PipelineSampler

            self.pipeline = PipelineSampler(export, SamplerConfig(**sampler))
            return
        self.group = SamplerGroup(export, SamplerConfig(**sampler))
        record = read_export(export)
        self.channels = record.dit.in_channels
        self.patch = tuple(record.dit.patch)
        self.flow = record.flow

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.close()

    def shift(self, shape: tuple[int, int, int, int]) -> float:
        _, t, h, w = shape
        pt, ph, pw = self.patch
        return self.flow.shift(-(-t // pt) * -(-h // ph) * -(-w // pw))

    def sample(self, rows: list[dict], text: list[np.ndarray], neg: list[np.ndarray]
               ) -> list[np.ndarray]:
        """Rows of one shape and one setting: their latents."""
        if self.pipeline is not None:
            return self.pipeline.sample(rows, text, neg)
        out = self.group.sample(**self.inputs(rows, text, neg))
        return [z.numpy() for z in out.float().cpu()]

    def inputs(self, rows: list[dict], text: list[np.ndarray], neg: list[np.ndarray]
               ) -> dict[str, Any]:
        """The DiT sampler's inputs for rows of one shape and setting (`sample_video_latents`'s
        keyword arguments): each row's own noise, its text and mask, fps, steps, shift, cfg."""
        r0 = rows[0]
        shape = latent_shape(self.channels, r0["frames"], r0["height"], r0["width"],
                             self.temporal, self.spatial)
        L = text[0].shape[0]
        inputs = dict(
            noise=torch.stack([row_noise(r["seed"], shape) for r in rows]),
            text=torch.from_numpy(np.stack(text)),
            text_mask=torch.stack([torch.arange(L) < r["text_len"] for r in rows]),
            fps=torch.tensor([float(r["fps"]) for r in rows]), steps=int(r0["steps"]),
            shift=self.shift(shape), guidance=float(r0["cfg"]))
        if r0["neg_len"] > 0:
            inputs.update(neg_text=torch.from_numpy(np.stack(neg)),
                          neg_mask=torch.stack([torch.arange(L) < r["neg_len"] for r in rows]))
        return inputs

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "sample")
        rows = batch.select(list(self.SETTINGS)).to_pylist()
        text, neg = unpack(batch, "text", np.float32), unpack(batch, "neg_text", np.float32)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[(r["height"], r["width"], r["frames"], r["steps"], r["cfg"],
                    r["neg_len"] > 0)].append(i)
        latents: list[np.ndarray | None] = [None] * len(rows)
        seconds = [0.0] * len(rows)
        for idx in groups.values():
            for lo in range(0, len(idx), self.max_batch):
                part = idx[lo:lo + self.max_batch]
                t0 = time.perf_counter()
                out = self.sample([rows[i] for i in part], [text[i] for i in part],
                                  [neg[i] for i in part])
                took = (time.perf_counter() - t0) / len(part)
                for i, z in zip(part, out, strict=True):
                    latents[i], seconds[i] = z, took
        batch = batch.drop_columns(list(TEXT_COLUMNS))
        return with_columns(batch, {**pack("latent", latents),
                                    "sample_seconds": pa.array(seconds, pa.float64())})
