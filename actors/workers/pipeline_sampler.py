"""The sampler of a diffusers pipeline folder (models/pipelines.py): its transformer and a
fresh scheduler per video, driven as the pipeline drives them, so a row's latents are the ones
`WanPipeline(prompt, negative_prompt, ..., generator=torch.Generator().manual_seed(seed))`
gives. `SampleStage` runs it in place of the `SamplerGroup` of a tubelet export.

One video per forward, as one pipeline call per prompt: the noise comes from the row's own
seed, drawn the way the pipeline draws it. The text stage ships each prompt's features at their
real length; here they are padded back with zeros to the length the transformer attends over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actors.workers.sampler import SamplerConfig
from models.pipelines import (
    MAX_SEQUENCE_LENGTH,
    initial_noise,
    load_transformer,
    new_scheduler,
    read_pipeline,
    sample_latents,
)


def padded(features: np.ndarray, length: int) -> torch.Tensor:
    """(n, D) features -> (1, length, D), zeros after the n real rows (the pipeline's layout)."""
    out = torch.zeros(1, length, features.shape[-1])
    out[0, :len(features)] = torch.from_numpy(np.array(features[:length], np.float32))
    return out


class PipelineSampler:
    """A pipeline folder's transformer (loaded once, alone) and its scheduler."""

    def __init__(self, folder: str | Path, cfg: SamplerConfig):
        if cfg.world_size > 1:
            raise ValueError("sequence / CFG parallel sampling of a diffusers pipeline folder is "
                             "not supported yet; use --sequence-parallel 1 without --cfg-parallel")
        self.record = read_pipeline(folder)
        self.device = cfg.torch_device()
        self.transformer = load_transformer(self.record, self.device, cfg.torch_dtype())
        self.length = MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def sample(self, rows: list[dict], text: list[np.ndarray], neg: list[np.ndarray]
               ) -> list[np.ndarray]:
        """Each row's latents (C, T', H', W') float32, in the transformer's latent space."""
        out = []
        for r, t, n in zip(rows, text, neg, strict=True):
            noise = initial_noise(self.record, r["frames"], r["height"], r["width"], r["seed"],
                                  self.device)
            latents = sample_latents(self.transformer, new_scheduler(self.record),
                                     padded(t, self.length), padded(n, self.length), noise,
                                     int(r["steps"]), float(r["cfg"]))
            out.append(latents[0].cpu().numpy())
        return out
