"""Stage: prompts -> text features, with the export's own text encoder (generation's first
stage).

Reads `prompt`, `negative_prompt`; writes `text` (float32 (L, D), L = the encoder's max_len
for every row) and `text_len` (real tokens; the mask is `arange(L) < text_len`), and the same
for the negative prompt (`neg_text`, `neg_len`; `neg_len` 0 = no negative prompt: guidance
then uses the DiT's learned null text).

Each prompt is encoded alone and padded to the fixed length L, so a prompt's features do not
depend on which other prompts share its batch (the same latents whatever the batching).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.tensors import pack, with_columns
from models.device import pick_device


def text_length(encoder: torch.nn.Module) -> int:
    """The fixed feature length rows are padded to: the encoder's token limit."""
    config = getattr(encoder, "config", None)
    return int(getattr(config, "max_len", None) or encoder.max_len)


class TextEncodeStage:
    READS = ("id", "prompt", "negative_prompt")
    WRITES = ("text", "text_shape", "text_len", "neg_text", "neg_text_shape", "neg_len",
              "text_seconds")

    @classmethod
    def spec(cls, cfg: Any, export: str, source: Any = None) -> StageSpec:
        """From a generate config (pipeline/generate.py `GenerateConfig`): its `text` pool
        (on the CPU: the encoder is small next to the sampler's DiT). `source`: the object
        store `export` was copied from (a node without the copy makes it)."""
        return StageSpec("text", cls, dict(export=export, device="cpu",
                                           num_cpus=cfg.text.num_cpus, source=source), cfg.text)

    def __init__(self, export: str, device: str = "cpu", num_cpus: float = 0.25,
                 source: Any = None):
        from actors.common.storage import ensure_local
        from models.export import load_text_encoder, model_kind, read_export

        ensure_local(export, source)

        self.device = pick_device(device, num_cpus)
        # The text encoder alone: the DiT's (or the pipeline's transformer's) tensors are the
        # sampler's, not read here.
        self.pipeline = model_kind(export) == "diffusers"
        if self.pipeline:
            from models.pipelines import load_text_encoder as load_pipeline_text
            from models.pipelines import read_pipeline

            self.encoder = load_pipeline_text(read_pipeline(export), self.device)
            self.length = self.encoder.max_len
        else:
            self.encoder = load_text_encoder(read_export(export), device=self.device)
            self.length = text_length(self.encoder)

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[np.ndarray, int]:
        """(features, n): a tubelet export's padded to the fixed length; a pipeline folder's at
        their real length n (its sampler pads them back: a UMT5-XXL prompt padded to 512 is
        8 MB in float32, its real tokens a few KB; CogVideoX's T5 rows are all real, n = 226)."""
        if self.pipeline:
            features, mask = self.encoder.encode([prompt])  # (1, 512 or 226, D)
            n = int(mask[0].sum())
            return features[0, :n].float().cpu().numpy(), n
        features, mask = self.encoder.encode([prompt], device=self.device)  # (1, l, D)
        n = int(mask[0].sum())
        out = np.zeros((self.length, features.shape[-1]), np.float32)
        out[:n] = features[0, :n].float().cpu().numpy()
        return out, n

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "text encode")
        t0 = time.perf_counter()
        text, neg = [], []
        for prompt, negative in zip(batch.column("prompt").to_pylist(),
                                    batch.column("negative_prompt").to_pylist(), strict=True):
            text.append(self.encode(prompt))
            if negative or self.pipeline:  # a pipeline encodes "" when none is given
                neg.append(self.encode(negative))
            else:  # guidance uses the DiT's learned null text
                neg.append((np.zeros_like(text[-1][0]), 0))
        took = (time.perf_counter() - t0) / max(1, batch.num_rows)
        return with_columns(batch, {
            **pack("text", [f for f, _ in text]),
            "text_len": pa.array([n for _, n in text], pa.int32()),
            **pack("neg_text", [f for f, _ in neg]),
            "neg_len": pa.array([n for _, n in neg], pa.int32()),
            "text_seconds": pa.array([took] * batch.num_rows, pa.float64()),
        })
