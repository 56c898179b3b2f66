"""Caption encode stage: latent rows in, the same rows with their caption's text features out,
made by a diffusers pipeline folder's own tokenizer and text encoder (`preprocess --model`).

Reads `id`, `caption`; writes `TEXT_COLUMNS` (actors/common/schema.py): `text_features` (a
flat list of the (n, D) features at their real length n, float32 or float16 as configured),
`text_shape` (n, D), `text_len` n, and `text_encoder` (`models.pipelines.text_encoder_id`:
the encoder class + a digest of its tokenizer and weights) so training can refuse features
from another encoder. The features are what the pipeline's own `encode_prompt` gives for the
caption (models/pipelines.py `PipelineTextEncoder`), cut to their n real rows; padded back
with zeros to the family's text length they are exactly its prompt embeddings. A video
without a caption gets the empty prompt's features (what the pipeline encodes for "").

Each caption is encoded alone (its features do not depend on its batch); the clips of one
video share a caption, so an actor keeps the last `CACHE` captions' features.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.schema import require_columns
from actors.common.stage import StageSpec
from actors.common.tensors import with_columns
from models.device import pick_device

CACHE = 256


class CaptionEncodeStage:
    READS = ("id", "caption")
    WRITES = ("text_features", "text_shape", "text_len", "text_encoder", "text_seconds")

    @classmethod
    def spec(cls, cfg: Any) -> StageSpec:
        """From a preprocess config (pipeline/streams.py `PreprocessConfig`): its `model`
        folder, `text_dtype` and `text` pool (GPU when the pool asks for one)."""
        device = "cuda" if cfg.text.num_gpus > 0 else "cpu"
        return StageSpec("text", cls, dict(model=cfg.model, dtype=cfg.text_dtype,
                                           device=device, num_cpus=cfg.text.num_cpus), cfg.text)

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu",
                 num_cpus: float = 1.0):
        from models.pipelines import load_text_encoder, read_pipeline, text_encoder_id

        record = read_pipeline(model)
        self.device = pick_device(device, num_cpus)
        self.encoder = load_text_encoder(record, self.device)
        self.id = text_encoder_id(record)
        self.dtype = np.dtype(dtype)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @torch.no_grad()
    def features(self, caption: str) -> np.ndarray:
        """(n, D) features of one caption at their real length, in the configured dtype."""
        if caption not in self.cache:
            hidden, mask = self.encoder.encode([caption])  # (1, L, D), (1, L)
            n = int(mask[0].sum())
            self.cache[caption] = hidden[0, :n].float().cpu().numpy().astype(self.dtype)
            if len(self.cache) > CACHE:
                self.cache.popitem(last=False)
        self.cache.move_to_end(caption)
        return self.cache[caption]

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "caption encode")
        t0 = time.perf_counter()
        feats = [self.features(c or "") for c in batch.column("caption").to_pylist()]
        took = (time.perf_counter() - t0) / max(1, batch.num_rows)
        flat = (np.concatenate([f.ravel() for f in feats]) if feats
                else np.zeros(0, self.dtype))
        offsets = np.concatenate([[0], np.cumsum([f.size for f in feats])]).astype(np.int32)
        return with_columns(batch, {
            "text_features": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "text_shape": pa.array([list(f.shape) for f in feats], pa.list_(pa.int32())),
            "text_len": pa.array([len(f) for f in feats], pa.int32()),
            "text_encoder": pa.array([self.id] * batch.num_rows, pa.string()),
            "text_seconds": pa.array([took] * batch.num_rows, pa.float64()),
        })
