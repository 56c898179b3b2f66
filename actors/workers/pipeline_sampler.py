"""The sampler of a diffusers pipeline folder (models/pipelines.py): its transformer and a
fresh scheduler per video, driven as the pipeline drives them, so a row's latents are the ones
`WanPipeline(prompt, negative_prompt, ..., generator=torch.Generator().manual_seed(seed))`
(or `CogVideoXPipeline(...)`) gives: models/pipelines.py `sample` runs the family's loop.
`SampleStage` runs it in place of the `SamplerGroup` of a tubelet export.

One video per forward, as one pipeline call per prompt: the noise comes from the row's own
seed, drawn the way the pipeline draws it. The text stage ships each prompt's features at their
real length; here they are padded back with zeros to the length the transformer attends over.

The ranks are a `SamplerGroup` (actors/workers/sampler.py) holding `PipelineModel`: one process,
or K sequence-parallel ranks (x2 with CFG parallel) that this process leads, each loading the
transformer alone; the parallel forward is actors/workers/pipeline_parallel.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.workers.pipeline_parallel import guided_noise, sharded
from actors.workers.sampler import RankModel, SamplerConfig, SamplerGroup
from actors.workers.sequence_parallel import SamplerMesh
from actors.workers.step_cache import StepCacheConfig
from models.pipelines import (
    PipelineRecord,
    latent_shape,
    load_transformer,
    new_scheduler,
    pipeline_noise,
    read_pipeline,
    sample,
)


def padded(features: np.ndarray, length: int) -> torch.Tensor:
    """(n, D) features -> (1, length, D), zeros after the n real rows (the pipeline's layout)."""
    out = torch.zeros(1, length, features.shape[-1])
    out[0, :len(features)] = torch.from_numpy(np.array(features[:length], np.float32))
    return out


class PipelineRank:
    """One rank's transformer (loaded once, alone) and the pipeline's loop over it."""

    def __init__(self, record: PipelineRecord, device: torch.device, dtype: torch.dtype,
                 cache: StepCacheConfig | None = None):
        self.record, self.device = record, device
        self.transformer = load_transformer(record, device, dtype)
        if cache is not None and cache.enabled:  # diffusers' own hook, not ours again
            from diffusers.hooks import FirstBlockCacheConfig

            self.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache.threshold))

    def __call__(self, inputs: dict[str, Any], mesh: SamplerMesh | None) -> torch.Tensor:
        """inputs: shape (1, C, T', H', W'), seed, prompt / negative (1, L, D), steps, guidance
        -> the latents, float32 on CPU. The noise is drawn here from the row's seed, as the
        pipeline draws it (every rank draws the same; CogVideoX in the transformer's dtype,
        its DPM scheduler then drawing on from the same generator). On a mesh:
        sequence-parallel (mesh.sp), the two guidance passes on the two CFG branches
        (mesh.cfg); a family without parallel samplers (CogVideoX) is refused before Ray
        (pipeline/generate.py)."""
        if getattr(self.transformer, "is_cache_enabled", False):
            self.transformer._reset_stateful_cache()  # a video's cache starts empty
        predict = guided_noise(self.transformer, mesh) if mesh is not None else None
        noise, generator = pipeline_noise(self.record, inputs["shape"], int(inputs["seed"]),
                                          self.transformer.dtype)
        with sharded(self.transformer, mesh.sp if mesh is not None else None):
            latents = sample(
                self.record, self.transformer, new_scheduler(self.record), inputs["prompt"],
                inputs["negative"], noise.to(self.device), int(inputs["steps"]),
                float(inputs["guidance"]), predict=predict, generator=generator)
        return latents.cpu()


class PipelineModel(RankModel):
    """A pipeline folder's transformer as a `SamplerGroup` rank holds it (picklable: a path)."""

    def __init__(self, folder: str | Path, cache: StepCacheConfig | None = None):
        self.folder, self.cache = str(folder), cache

    def load(self, device: torch.device, dtype: torch.dtype) -> PipelineRank:
        return PipelineRank(read_pipeline(self.folder), device, dtype, self.cache)


class PipelineSampler:
    """A pipeline folder's sampler: its group of ranks and the rows' noise and text."""

    def __init__(self, folder: str | Path, cfg: SamplerConfig):
        self.record = read_pipeline(folder)
        self.group = SamplerGroup(PipelineModel(self.record.given, cfg.cache), cfg)
        self.length = self.record.family.text_length  # Wan 512, CogVideoX 226

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.close()

    @torch.no_grad()
    def sample(self, rows: list[dict], text: list[np.ndarray], neg: list[np.ndarray]
               ) -> list[np.ndarray]:
        """Each row's latents (C, T', H', W') float32, in the transformer's latent space."""
        out = []
        for r, t, n in zip(rows, text, neg, strict=True):
            shape = (1, *latent_shape(self.record, r["frames"], r["height"], r["width"]))
            latents = self.group.run(dict(
                shape=shape, prompt=padded(t, self.length), negative=padded(n, self.length),
                steps=int(r["steps"]), guidance=float(r["cfg"]), seed=int(r["seed"])))
            out.append(latents[0].numpy())
        return out
