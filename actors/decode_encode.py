"""Decode + VAE encode in one actor: clip plan rows in, latents out; frames never leave it.

docs/design.md: decoded frames are ~100x the bytes of the mp4 they come from (a 65-frame 720p
clip: ~1 MB of h264, ~180 MB of uint8 frames, ~8 MB of latent), so between nodes move encoded
bytes or latents, not frames. With separate decode and encode pools, Ray Data puts every
decoded clip in the object store, and when the two pools sit on different nodes (CPU decode
nodes, GPU VAE nodes) each clip crosses the network as frames. This stage runs
`actors.decode.DecodeStage` and `actors.vae_encode.VAEEncodeStage` back to back in the same
process: what reaches the object store is the clip plan going in and the latents coming out.

The price: inside one actor decode and encode take turns (the GPU waits while the CPU decodes
a batch), where two pools overlap them. Choose it (`preprocess.fuse_decode: true`) when the
network or object store is the limit, or when the VAE nodes have CPUs to spare for decoding;
keep two pools when decode and encode run on the same nodes anyway.

Errors keep their stage names: an undecodable clip is an error row at "decode", a failed
forward one at "encode"; the other rows of the batch go on.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.common.buckets import BucketConfig
from actors.common.stage import StageSpec
from actors.common.vae import VAEStageConfig
from actors.decode import DecodeBudget, DecodeStage
from actors.vae_encode import VAEEncodeStage


class DecodeEncodeStage:
    """Clip plan rows -> latent rows (what DecodeStage then VAEEncodeStage give, in one call).

    Resources: the encode stage's (a GPU, or a CPU share for torch) plus the CPUs that
    `threads` lets FFmpeg's decoder use.
    """

    READS = DecodeStage.READS  # every other input column passes through
    WRITES = ("decode_seconds", "decode_node", *VAEEncodeStage.WRITES)

    @classmethod
    def spec(cls, cfg: Any, errors_dir: Any, fs: Any = None) -> StageSpec:
        """From a preprocess config: the VAE encode stage's settings and `encode` pool, plus
        the decode stage's threads and budget (its `decode` pool is not used); `fs`: the
        filesystem of object-store inputs."""
        encode = VAEEncodeStage.spec(cfg, errors_dir)
        return StageSpec("encode", cls, dict(**encode.kwargs, threads=cfg.decode_threads,
                                             budget=cfg.decode_budget, fs=fs), cfg.encode)

    def __init__(self, vae: VAEStageConfig, buckets: BucketConfig,
                 errors_dir: Any = None, latent_dtype: str = "float16",
                 num_cpus: float = 1.0, threads: int = 0,
                 budget: DecodeBudget | None = None, fs: Any = None):
        self.decode = DecodeStage(errors_dir, threads, budget, fs)
        self.encode = VAEEncodeStage(vae, buckets, errors_dir, latent_dtype, num_cpus)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encode(self.decode(batch))  # each checks its own input columns
