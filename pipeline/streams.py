"""The Ray Data graphs several commands share: videos -> clips -> latents, and their configs.

    plan_stages    videos -> probe -> bucket                 clip plan rows
    clip_stages    + decode                                  frames (train-vae, eval-vae)
    latent_stages  + VAE encode (or decode+encode fused)     latents (preprocess, train --input)

Each is a list of `StageSpec`s (actors/common/stage.py): `stream` runs it as a Ray Data graph
of actor pools, `run_here` in this process, pipeline/pools.py sizes its pools. A library, not
a command: `preprocess`, `train`, `train-vae` and `eval-vae` each build on these, and no
command imports another command (the `preprocess` command, with its writer and summary, is
`pipeline/preprocess.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from actors.assign import AssignStage
from actors.caption_encode import CaptionEncodeStage
from actors.common.buckets import BucketConfig, BucketTable
from actors.common.stage import StageResources, StageSpec, apply_all
from actors.common.storage import StorageConfig, Store
from actors.common.vae import VAEStageConfig
from actors.decode import DecodeBudget, DecodeStage
from actors.decode_encode import DecodeEncodeStage
from actors.probe import ProbeStage
from actors.vae_encode import VAEEncodeStage
from pipeline.runtime import RayConfig
from pipeline.sources import VIDEO_EXTENSIONS, list_sources


@dataclass
class ClipConfig:
    """Videos -> clips: listing, probe, bucket and decode (the `preprocess:` section of the
    train-vae and eval-vae configs; `PreprocessConfig` adds the VAE and the writer)."""

    buckets: BucketConfig = field(default_factory=BucketConfig)
    max_pixels: int = 8192 * 8192  # headers claiming more are refused before decoding
    max_side: int = 16384
    # frames a file's header may claim (0 = no limit): more is refused before decoding
    max_frames: int = 1_000_000
    decode_threads: int = 0  # FFmpeg decoder threads per decode actor; 0 = FFmpeg decides
    # what one clip may cost to decode (wall seconds, decoder frames, the largest picture the
    # decoder may allocate; 0 = no limit): more is an error row, so a hostile stream cannot
    # hang the job, nor grow past the probe's size limit mid-way to exhaust memory
    decode_budget: DecodeBudget = field(
        default_factory=lambda: DecodeBudget(120.0, 20000, 8192 * 8192))
    # wall seconds FFmpeg may spend opening one file's headers (0 = no limit): a stalled
    # read (a network mount, a device) becomes an error row instead of a stuck probe actor
    probe_seconds: float = 30.0
    video_extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    # object-store access (s3:// paths): endpoint, region, anonymous; credentials come from
    # the AWS_* variables / the SDK's chain, never from here (actors/common/storage.py)
    storage: StorageConfig = field(default_factory=StorageConfig)
    probe: StageResources = field(default_factory=lambda: StageResources(0.2, batch_size=16))
    assign: StageResources = field(default_factory=lambda: StageResources(0.1, batch_size=16))
    decode: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=4))

    def validate(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            raise ValueError("max_pixels and max_side: must be >= 1")
        if self.max_frames < 0:
            raise ValueError(f"max_frames: must be >= 0 (0 = no limit), got {self.max_frames}")
        if min(self.decode_budget.seconds, self.decode_budget.frames,
               self.decode_budget.pixels) < 0:
            raise ValueError("decode_budget.seconds, .frames and .pixels: must be >= 0 "
                             "(0 = no limit)")
        if not self.probe_seconds >= 0:
            raise ValueError(f"probe_seconds: must be >= 0 (0 = no limit), got "
                             f"{self.probe_seconds}")
        # A bucket no video can fill: probe refuses every video large enough to cover it, or
        # its clips cost more decoder frames than the budget allows. One line, before Ray.
        for b in BucketTable(self.buckets).buckets.values():
            if b.height * b.width > self.max_pixels or max(b.height, b.width) > self.max_side:
                raise ValueError(f"buckets.resolutions.{b.resolution}: bucket {b.name} "
                                 f"({b.width}x{b.height}) is larger than max_pixels="
                                 f"{self.max_pixels} / max_side={self.max_side}, so no video "
                                 "can fit it; lower its pixels or raise the limits")
            if self.decode_budget.pixels and b.height * b.width > self.decode_budget.pixels:
                raise ValueError(f"buckets.resolutions.{b.resolution}: bucket {b.name} "
                                 f"({b.width}x{b.height}) is larger than decode_budget.pixels="
                                 f"{self.decode_budget.pixels}, so no video can fit it; lower "
                                 "its pixels or raise the budget")
            if self.decode_budget.frames and b.num_frames > self.decode_budget.frames:
                raise ValueError(f"buckets.resolutions.{b.resolution}: bucket {b.name} needs "
                                 f"{b.num_frames} frames, more than decode_budget.frames="
                                 f"{self.decode_budget.frames}; no clip could be decoded")


@dataclass
class PreprocessConfig(ClipConfig):
    """`tubelet preprocess` (configs/preprocess/) and the `preprocess:` section of `train`."""

    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    latent_dtype: Literal["float16", "float32"] = "float16"
    # A diffusers pipeline folder (`preprocess --model`): latents from its VAE (vae.checkpoint
    # is set to FOLDER/vae) and each caption's features from its text encoder, in a `text`
    # pool of their own (actors/caption_encode.py), written as `text_dtype` beside the latents.
    model: str = ""
    text_dtype: Literal["float32", "float16"] = "float32"
    text: StageResources = field(default_factory=lambda: StageResources(0.25, batch_size=16))
    # Decode inside the VAE encode actors (actors/decode_encode.py; `encode` resources, the
    # `decode` pool unused): frames never enter the object store or cross nodes, but decode
    # and encode take turns instead of overlapping. See docs/preprocess.md "Decode next to the VAE".
    fuse_decode: bool = False
    encode: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=8))
    write: StageResources = field(default_factory=lambda: StageResources(0.1, batch_size=16))
    ray: RayConfig = field(default_factory=RayConfig)


def plan_stages(cfg: ClipConfig, errors_dir: str | Path | Store | None,
                done_ids: set[str] | frozenset[str] = frozenset(), fs: Any = None
                ) -> list[StageSpec]:
    """Videos -> probe -> bucket: clip plan rows (one per clip to make, `done_ids` left out).
    `fs`: the filesystem the input URIs are read through (`Store.fs` of the input)."""
    errors = _str(errors_dir)
    return [ProbeStage.spec(cfg, errors, fs), AssignStage.spec(cfg, errors, done_ids)]


def clip_stages(cfg: ClipConfig, errors_dir: str | Path | Store | None,
                done_ids: set[str] | frozenset[str] = frozenset(), fs: Any = None
                ) -> list[StageSpec]:
    """`plan_stages` + decode: decoded clip rows (`frames` + `frames_shape`). `train-vae`
    trains on these, `eval-vae` reconstructs them."""
    errors = _str(errors_dir)
    return [*plan_stages(cfg, errors, done_ids, fs), DecodeStage.spec(cfg, errors, fs)]


def latent_stages(cfg: PreprocessConfig, errors_dir: str | Path | Store | None,
                  done_ids: set[str] | frozenset[str] = frozenset(), fs: Any = None
                  ) -> list[StageSpec]:
    """`clip_stages` + VAE encode (with `fuse_decode`, `plan_stages` + decode and encode in one
    actor), + caption encode with a pipeline `model`: latent rows. `preprocess` adds the
    writer; `train --input` feeds the rows straight to the trainer."""
    errors = _str(errors_dir)
    text = [CaptionEncodeStage.spec(cfg)] if cfg.model else []
    if cfg.fuse_decode:
        return [*plan_stages(cfg, errors, done_ids, fs), DecodeEncodeStage.spec(cfg, errors, fs),
                *text]
    return [*clip_stages(cfg, errors, done_ids, fs), VAEEncodeStage.spec(cfg, errors), *text]


def _str(path: str | Path | Store | None) -> str | Store | None:
    """A stage's errors folder as its actors take it (a str or a Store crosses to them; None:
    no rows)."""
    return None if path is None else path if isinstance(path, Store) else str(path)


def source_dataset(sources: pa.Table, rows_per_block: int):
    """The listing as a lazy Ray Dataset, cut into blocks of `rows_per_block` videos here, not
    with .repartition(): that runs Ray tasks of 1 CPU each, which never get scheduled while
    the actor pools hold the fractional CPUs of a 2-core machine."""
    import ray.data

    n = rows_per_block
    return ray.data.from_arrow([sources.slice(i, n) for i in range(0, sources.num_rows, n)])


def stream(cfg: ClipConfig, sources: pa.Table | str, specs: list[StageSpec]):
    """The Ray Dataset of `specs` over `sources` (a listing, or a folder / file to list)."""
    if isinstance(sources, str):
        sources = list_sources(sources, tuple(cfg.video_extensions), cfg.storage)
    return apply_all(source_dataset(sources, cfg.probe.batch_size), specs)


def latent_channels(vae: VAEStageConfig) -> int:
    """Channels of the latents `vae` writes (C of `latent_shape`): the checkpoint's, or its
    preset's without one."""
    from actors.common.vae import load_checkpoint_vae
    from models.vae import PRESETS

    if vae.checkpoint:
        return load_checkpoint_vae(vae.checkpoint).latent_channels
    if vae.preset not in PRESETS:
        raise ValueError(f"unknown VAE preset {vae.preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[vae.preset]().latent_channels
