"""`tubelet preprocess`: videos -> probe -> bucket -> decode -> VAE encode -> latent Parquet.

A streaming Ray Data graph of actor-pool stages with Arrow batches between them; only small
per-batch stats rows come back to the driver. Output, in DIR:
  latents/   the latent dataset (docs/design.md contract), one whole Parquet file per batch;
             with `--model FOLDER` (a diffusers pipeline) also each caption's features from
             that pipeline's text encoder (actors/caption_encode.py)
  errors/    one row per unusable input or skipped video (path, stage, kind, error)
  summary.json, config.yaml, run.json
Resume: clips already in latents/ and paths already in errors/ are not done again, so a rerun
after a crash (even kill -9: files are renamed into place whole) ends with every clip once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds

from actors.common.stage import StageSpec
from actors.common.storage import Store, filesystem_of, redact, resolve
from actors.common.vae import VAELoadError, resolve_checkpoint, vae_normalisation
from actors.write import LatentWriter, parquet_files, read_error_paths, read_ids
from pipeline.config import ConfigError, output_store, to_dict, write_run_record
from pipeline.pools import sized
from pipeline.runtime import ray_session
from pipeline.sources import list_sources
from pipeline.streams import PreprocessConfig, latent_stages, stream


def preprocess_stages(cfg: PreprocessConfig, out: Path | Store,
                      done_ids: set[str] | frozenset[str] = frozenset(), fs: Any = None
                      ) -> list[StageSpec]:
    """The whole preprocess graph: `latent_stages` (pipeline/streams.py) + the Parquet writer.
    `out`: a folder or a Store (an object-store prefix); `fs`: the inputs' filesystem."""
    out = out if isinstance(out, Store) else resolve(out)
    return [*latent_stages(cfg, out.child("errors"), done_ids, fs),
            LatentWriter.spec(cfg, out.child("latents"))]


def with_model(cfg: PreprocessConfig, latents: Store) -> tuple[PreprocessConfig, str]:
    """`--model FOLDER`: (cfg with vae.checkpoint = FOLDER/vae, the text encoder's id), or one
    ConfigError line: not a pipeline folder, another VAE asked for as well, or latents
    already in the output whose caption features another encoder made (or none)."""
    from models.pipelines import PipelineError, read_pipeline, text_encoder_id, vae_folder

    try:
        record = read_pipeline(cfg.model)
    except PipelineError as e:
        raise ConfigError(f"--model: {e}") from None
    vae = str(vae_folder(record))
    if cfg.vae.checkpoint and Path(cfg.vae.checkpoint).resolve() != Path(vae):
        raise ConfigError(f"--model {cfg.model} encodes with its own VAE ({vae}); drop --vae "
                          f"{cfg.vae.checkpoint} (vae.checkpoint), or drop --model")
    encoder = text_encoder_id(record)
    files = parquet_files(latents, "part-")
    if files:
        import pyarrow.parquet as pq

        with files[0].fs.open_input_file(files[0].path) as f:
            table = pq.ParquetFile(f)
            found = (table.read(columns=["text_encoder"]).column(0)[0].as_py()
                     if "text_encoder" in table.schema_arrow.names and table.metadata.num_rows
                     else None)
        if found != encoder:
            what = f"features from {found}" if found else "no caption features"
            raise ConfigError(f"{latents} already holds latents with {what}, not {encoder} "
                              f"of {cfg.model}; write to a new --output")
    return replace(cfg, model=str(record.folder), vae=replace(cfg.vae, checkpoint=vae)), encoder


def reason_of(error: str) -> str:
    """Group key for the summary: the message up to its first ':' ('too small', ...)."""
    return error.split(":", 1)[0].strip()


def summarize(out: Store, stats: list[dict], wall: float, cfg: PreprocessConfig,
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
    err_files = parquet_files(out.child("errors"))
    errors = (pds.dataset([f.path for f in err_files], filesystem=err_files[0].fs)
              .to_table().to_pylist() if err_files else [])
    by_reason = Counter(f"{e['kind']} at {e['stage']}: {reason_of(e['error'])}" for e in errors)

    def rate(n: float, busy: float) -> float | None:
        return round(n / busy, 2) if busy > 0 else None

    return {
        "inputs": inputs,
        "clips_written": written,
        "clips_already_done": resumed_clips,
        "clips_in_dataset": len(read_ids(out.child("latents"))),
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


def run_preprocess(cfg: PreprocessConfig, src: str, output: str | Path,
                   address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Raises ConfigError (no such VAE), SourceError (bad input) or OutputError (an output
    that cannot be written: no bucket, no credentials, ...) before starting Ray. `src` and
    `output` may be object-store URIs (actors/common/storage.py)."""
    out = output_store(output, cfg.storage)
    text_encoder = ""
    if cfg.model:  # a pipeline folder: its VAE, its text encoder
        cfg, text_encoder = with_model(cfg, out.child("latents"))
    try:  # refuse a missing VAE before starting anything
        checkpoint = resolve_checkpoint(cfg.vae.checkpoint)
    except VAELoadError as e:
        raise ConfigError(str(e)) from None
    cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=checkpoint))

    def graph(c: PreprocessConfig) -> list[StageSpec]:
        return preprocess_stages(c, out)

    cfg = sized("preprocess", cfg, graph, address)  # before Ray
    start = time.perf_counter()
    sources = list_sources(src, tuple(cfg.video_extensions), cfg.storage)
    inputs = filesystem_of([str(src)], cfg.storage)
    done_ids = set(read_ids(out.child("latents")))
    seen_errors = read_error_paths(out.child("errors"))
    todo = sources.filter(pa.array([p not in seen_errors for p in
                                    sources.column("path").to_pylist()]))
    stats: list[dict] = []
    if todo.num_rows:
        with ray_session(address, cfg.ray):
            cfg = sized("preprocess", cfg, graph, address)  # a joined cluster's own size
            ds = stream(cfg, todo, preprocess_stages(cfg, out, done_ids, inputs))
            last = 0.0
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                stats.extend(batch.to_pylist())
                if progress and time.perf_counter() - last > 5:
                    last = time.perf_counter()
                    n = sum(s["clips"] for s in stats)
                    print(f"[preprocess] {n} clips written, {time.perf_counter() - start:.0f}s",
                          flush=True)
    wall = time.perf_counter() - start
    written = sum(s["clips"] for s in stats)
    summary = summarize(out, stats, wall, cfg, sources.num_rows, len(done_ids))
    out.child("summary.json").write_text(redact(json.dumps(summary, indent=2)))
    write_run_record(out, "preprocess", cfg, input=redact(str(src)), vae=checkpoint or None,
                     vae_normalisation=vae_normalisation(checkpoint), clips_written=written,
                     model=cfg.model or None, text_encoder=text_encoder or None)
    return summary
