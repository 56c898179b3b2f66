"""`tubelet preprocess`: videos -> probe -> bucket -> decode -> VAE encode -> latent Parquet.

A streaming Ray Data graph of actor-pool stages with Arrow batches between them; only small
per-batch stats rows come back to the driver. Output, in DIR:
  latents/   the latent dataset (DESIGN.md contract), one whole Parquet file per batch
  errors/    one row per unusable input or skipped video (path, stage, kind, error)
  summary.json, config.yaml, run.json
Resume: clips already in latents/ and paths already in errors/ are not done again, so a rerun
after a crash (even kill -9: files are renamed into place whole) ends with every clip once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as pds

from actors.assign import AssignStage
from actors.common.buckets import BucketConfig
from actors.decode import DecodeStage
from actors.decode_encode import DecodeEncodeStage
from actors.probe import ProbeStage
from actors.vae_encode import VAEEncodeStage, VAEStageConfig, resolve_checkpoint
from actors.write import LatentWriter, read_error_paths, read_ids
from pipeline.config import ConfigError, to_dict, write_run_record
from pipeline.runtime import RayConfig, StageResources, check_budget, init_ray
from pipeline.sources import VIDEO_EXTENSIONS, list_sources


@dataclass
class PreprocessConfig:
    buckets: BucketConfig = field(default_factory=BucketConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    latent_dtype: Literal["float16", "float32"] = "float16"
    max_pixels: int = 8192 * 8192  # headers claiming more are refused before decoding
    max_side: int = 16384
    decode_threads: int = 0  # FFmpeg decoder threads per decode actor; 0 = FFmpeg decides
    # Decode inside the VAE encode actors (actors/decode_encode.py; `encode` resources, the
    # `decode` pool unused): frames never enter the object store or cross nodes, but decode
    # and encode take turns instead of overlapping. See README "Decode next to the VAE".
    fuse_decode: bool = False
    video_extensions: list[str] = field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    probe: StageResources = field(default_factory=lambda: StageResources(0.2, batch_size=16))
    assign: StageResources = field(default_factory=lambda: StageResources(0.1, batch_size=16))
    decode: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=4))
    encode: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=8))
    write: StageResources = field(default_factory=lambda: StageResources(0.1, batch_size=16))
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            raise ValueError("max_pixels and max_side: must be >= 1")

    def stages(self) -> dict[str, StageResources]:
        """The actor pools the graph runs (what `check_budget` weighs)."""
        pools = {"probe": self.probe, "assign": self.assign, "decode": self.decode,
                 "encode": self.encode, "write": self.write}
        if self.fuse_decode:
            del pools["decode"]
        return pools


def plan_stream(cfg: PreprocessConfig, sources: pa.Table | str, errors_dir: str | Path,
                done_ids: set[str] | frozenset[str] = frozenset()):
    """Videos -> probe -> bucket: a lazy Ray Dataset of clip plan rows (one per clip to make,
    those in `done_ids` left out)."""
    import ray.data

    if isinstance(sources, str):
        sources = list_sources(sources, tuple(cfg.video_extensions))
    errors = str(errors_dir)
    # Blocks are cut here, not with .repartition(): that runs Ray tasks of 1 CPU each, which
    # never get scheduled while the actor pools hold the fractional CPUs of a 2-core machine.
    step = cfg.probe.batch_size
    ds = ray.data.from_arrow([sources.slice(i, step) for i in range(0, sources.num_rows, step)])
    ds = ds.map_batches(ProbeStage, **cfg.probe.map_batches_kwargs(
        errors_dir=errors, max_pixels=cfg.max_pixels, max_side=cfg.max_side))
    return ds.map_batches(AssignStage, **cfg.assign.map_batches_kwargs(
        buckets=cfg.buckets, errors_dir=errors, done_ids=frozenset(done_ids)))


def clip_stream(cfg: PreprocessConfig, sources: pa.Table | str, errors_dir: str | Path,
                done_ids: set[str] | frozenset[str] = frozenset()):
    """`plan_stream` + decode: a lazy Ray Dataset of decoded clip rows (`frames` +
    `frames_shape`). `train-vae` trains on these; `latent_stream` adds the VAE encode."""
    ds = plan_stream(cfg, sources, errors_dir, done_ids)
    return ds.map_batches(DecodeStage, **cfg.decode.map_batches_kwargs(
        errors_dir=str(errors_dir), threads=cfg.decode_threads))


def latent_stream(cfg: PreprocessConfig, sources: pa.Table | str, errors_dir: str | Path,
                  done_ids: set[str] | frozenset[str] = frozenset(), vae_checkpoint: str = ""):
    """`clip_stream` + VAE encode (or, with `fuse_decode`, `plan_stream` + decode and encode
    in one actor): a lazy Ray Dataset of latent rows. Each stage is an actor pool sized by the
    config. `preprocess` adds the writer; `train --input` feeds the rows straight to the
    trainer."""
    vae = cfg.vae
    if vae_checkpoint:
        vae = VAEStageConfig(**{**to_dict(cfg.vae), "checkpoint": vae_checkpoint})
    encode = dict(vae=vae, buckets=cfg.buckets, errors_dir=str(errors_dir),
                  latent_dtype=cfg.latent_dtype, num_cpus=cfg.encode.num_cpus)
    if cfg.fuse_decode:
        ds = plan_stream(cfg, sources, errors_dir, done_ids)
        return ds.map_batches(DecodeEncodeStage, **cfg.encode.map_batches_kwargs(
            **encode, threads=cfg.decode_threads))
    ds = clip_stream(cfg, sources, errors_dir, done_ids)
    return ds.map_batches(VAEEncodeStage, **cfg.encode.map_batches_kwargs(**encode))


def build_dataset(cfg: PreprocessConfig, sources: pa.Table, out: Path,
                  done_ids: set[str], vae_checkpoint: str):
    """The whole preprocess graph (lazy): `latent_stream` + the Parquet writer pool."""
    ds = latent_stream(cfg, sources, out / "errors", done_ids, vae_checkpoint)
    return ds.map_batches(LatentWriter, **cfg.write.map_batches_kwargs(
        latents_dir=str(out / "latents")))


def reason_of(error: str) -> str:
    """Group key for the summary: the message up to its first ':' ('too small', ...)."""
    return error.split(":", 1)[0].strip()


def summarize(out: Path, stats: list[dict], wall: float, cfg: PreprocessConfig,
              inputs: int, resumed_clips: int) -> dict[str, Any]:
    per_bucket: Counter = Counter()
    nodes: Counter = Counter()
    frames = Counter()
    seconds = Counter()
    for s in stats:
        per_bucket[s["bucket"]] += s["clips"]
        nodes[s["decode_node"]] += s["clips"]
        frames[s["bucket"]] += s["frames"]
        for k in ("decode_seconds", "encode_seconds", "write_seconds"):
            seconds[k] += s[k]
    written = sum(per_bucket.values())
    total_frames = sum(frames.values())
    err_files = sorted((out / "errors").glob("*.parquet"))
    errors = (pds.dataset(err_files).to_table().to_pylist() if err_files else [])
    by_reason = Counter(f"{e['kind']} at {e['stage']}: {reason_of(e['error'])}" for e in errors)

    def rate(n: float, busy: float) -> float | None:
        return round(n / busy, 2) if busy > 0 else None

    return {
        "inputs": inputs,
        "clips_written": written,
        "clips_already_done": resumed_clips,
        "clips_in_dataset": len(read_ids(out / "latents")),
        "frames_written": total_frames,
        "per_bucket": dict(sorted(per_bucket.items())),
        "decode_nodes": dict(nodes),  # clips decoded per Ray node id
        "errors": sum(1 for e in errors if e["kind"] == "error"),
        "skipped": sum(1 for e in errors if e["kind"] == "skip"),
        "by_reason": dict(by_reason.most_common()),
        "wall_seconds": round(wall, 2),
        "clips_per_second": rate(written, wall),
        "frames_per_second": rate(total_frames, wall),
        # Per actor-busy-second: what one actor of the stage sustains.
        "stage_throughput": {
            "decode_frames_per_busy_second": rate(total_frames, seconds["decode_seconds"]),
            "encode_frames_per_busy_second": rate(total_frames, seconds["encode_seconds"]),
            "write_clips_per_busy_second": rate(written, seconds["write_seconds"]),
        },
        "stage_busy_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "config": to_dict(cfg),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{'bucket':<28}{'clips':>8}")
    for bucket, n in summary["per_bucket"].items():
        print(f"{bucket:<28}{n:>8}")
    print(f"{'total written':<28}{summary['clips_written']:>8}")
    print(f"{'already done (resumed)':<28}{summary['clips_already_done']:>8}")
    for reason, n in summary["by_reason"].items():
        print(f"  {reason:<50}{n:>6}")
    print(f"{summary['inputs']} inputs, {summary['errors']} errors, {summary['skipped']} skipped; "
          f"{summary['wall_seconds']}s wall, {summary['clips_per_second']} clips/s, "
          f"{summary['frames_per_second']} frames/s")


def run_preprocess(cfg: PreprocessConfig, src: str, output: str | Path,
                   vae_checkpoint: str = "", address: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    import ray

    out = Path(output)
    try:  # refuse a missing VAE before starting anything
        checkpoint = resolve_checkpoint(vae_checkpoint or cfg.vae.checkpoint)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=checkpoint))
    vae_checkpoint = ""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sources = list_sources(src, tuple(cfg.video_extensions))
    done_ids = set(read_ids(out / "latents"))
    seen_errors = read_error_paths(out / "errors")
    todo = sources.filter(pa.array([p not in seen_errors for p in
                                    sources.column("path").to_pylist()]))
    stats: list[dict] = []
    started = False
    if todo.num_rows:
        started = init_ray(address, cfg.ray)
        try:
            if not address and started:
                check_budget(cfg.stages())
            ds = build_dataset(cfg, todo, out, done_ids, vae_checkpoint)
            last = 0.0
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                stats.extend(batch.to_pylist())
                if progress and time.perf_counter() - last > 5:
                    last = time.perf_counter()
                    n = sum(s["clips"] for s in stats)
                    print(f"[preprocess] {n} clips written, {time.perf_counter() - start:.0f}s",
                          flush=True)
        finally:
            if started:
                ray.shutdown()
    wall = time.perf_counter() - start
    written = sum(s["clips"] for s in stats)
    summary = summarize(out, stats, wall, cfg, sources.num_rows, len(done_ids))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_run_record(out, "preprocess", cfg, input=str(src), vae=checkpoint or None,
                     clips_written=written)
    return summary
