"""`tubelet generate`: prompts -> text encode -> sampler -> VAE decode -> mp4 encode.

The model (--checkpoint) is a tubelet run or export (models/export.py), or a diffusers
pipeline folder (model_index.json, models/pipelines.py: Wan 2.1 T2V and Wan 2.2 TI2V-5B,
text-to-video; CogVideoX 2B / 5B on one rank), whose own text encoder, transformer + scheduler
and VAE the stages load, each only its own part.

A streaming Ray Data graph of four actor-pool stages (one file each in actors/) with Arrow
batches between them; what comes back to the driver is one small manifest row per video.
Output, in DIR:
  videos/<name>.mp4   one per prompt row (name: the row's id made safe, pipeline/prompts.py)
  sheets/<name>.png   a contact sheet of each video
  manifest/           Parquet parts, each written whole: id, prompt, negative_prompt, seed,
                      height, width, frames, fps, steps, cfg, checkpoint, checkpoint_digest,
                      file, sheet, latents, per-stage seconds
  latents/<name>.npy  with `save_latents`: each row's latents float32 (C, T, H, W) before decode
  index.html          the gallery: every video plays, with its prompt and settings
  config.yaml, run.json, summary.json
Resume: ids already in the manifest (with their file present) are not generated again; an mp4
is renamed into place before its manifest row is written, so after a kill -9 a rerun ends with
every id exactly once and no half file under a final name.

Everything the user can get wrong is checked before Ray starts (one line, exit 2): the
checkpoint (a run folder, its export or a pipeline folder), the VAE and its latent channels
against the model's, and every prompt row (pipeline/prompts.py).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from actors.common.errors import write_atomic
from actors.common.stage import StageResources, StageSpec, apply_all, chain
from actors.common.storage import (
    StorageConfig,
    StorageError,
    Store,
    as_store,
    is_uri,
    local_copy,
    locate,
    redact,
    resolve,
    storage_reason,
)
from actors.common.vae import VAELoadError, VAEStageConfig, load_checkpoint_vae
from actors.mp4_encode import Mp4EncodeStage
from actors.sample import SampleStage
from actors.text_encode import TextEncodeStage
from actors.vae_decode import VAEDecodeStage
from actors.workers.sampler import SamplerConfig
from actors.write import parquet_files
from models.export import ExportError, ExportRecord, model_kind, read_export
from models.pipelines import (
    PipelineError,
    PipelineRecord,
    pipeline_digest,
    read_pipeline,
    vae_folder,
)
from models.vae import as_floats
from pipeline.config import ConfigError, UsageError, output_store, to_dict, write_run_record
from pipeline.pools import cluster_of, sized
from pipeline.prompts import Defaults, Grid, PromptError, read_prompts
from pipeline.runtime import RayConfig, ray_session

SHIPPED_VAE = "weights/vae-dc.safetensors"
MANIFEST_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "height", "width", "frames",
                    "fps", "steps", "cfg", "checkpoint", "checkpoint_digest", "file", "sheet",
                    "latents", "text_seconds", "sample_seconds", "decode_seconds",
                    "encode_seconds")


def _resources(num_cpus: float, batch_size: int) -> StageResources:
    return StageResources(num_cpus=num_cpus, batch_size=batch_size, max_tasks_in_flight=1)


@dataclass
class GenerateConfig:
    defaults: Defaults = field(default_factory=Defaults)  # for rows that give no setting
    # auto: a pipeline folder's own VAE, else the shipped one (what the demo DiT's latents use)
    vae: VAEStageConfig = field(default_factory=lambda: VAEStageConfig(checkpoint="auto"))
    save_latents: bool = False  # also DIR/latents/<name>.npy: each row's latents before decode
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    max_batch: int = 4  # videos per sampler forward (rows of one shape and setting)
    # mp4 settings (actors/mp4_encode.py): libx264 crf 18 yuv420p is the default; crf 0 with
    # yuv444p keeps (nearly) every decoded value, at several times the size
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    pix_fmt: str = "yuv420p"
    chunk_frames: int = 16  # VAE decode's causal time chunk (bounds its memory)
    # text encode runs in the sampler's actors and mp4 encode in the VAE decoder's (two pools,
    # `sample` and `decode`, instead of four): fewer processes to start on a small machine
    share_processes: bool = False
    text: StageResources = field(default_factory=lambda: _resources(0.2, 8))
    sample: StageResources = field(default_factory=lambda: _resources(0.8, 1))
    decode: StageResources = field(default_factory=lambda: _resources(0.5, 1))
    encode: StageResources = field(default_factory=lambda: _resources(0.2, 1))
    ray: RayConfig = field(default_factory=RayConfig)
    # object-store access for s3:// paths (--checkpoint, --prompts, --output):
    # actors/common/storage.py
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf: must be in [0, 51], got {self.crf}")
        check_encoder(self.codec, self.pix_fmt)
        if self.chunk_frames < 4 or self.chunk_frames % 4:
            raise ValueError(f"chunk_frames: must be a positive multiple of 4, got "
                             f"{self.chunk_frames}")


def check_encoder(codec: str, pix_fmt: str) -> None:
    """The codec must be one this PyAV build encodes, taking `pix_fmt`."""
    import av

    try:
        formats = {f.name for f in av.codec.Codec(codec, "w").video_formats or ()}
    except (ValueError, av.error.FFmpegError):
        raise ValueError(f"codec: {codec!r} is not a video encoder of this PyAV build; use "
                         "libx264, libx265, libvpx-vp9, libsvtav1, mpeg4 or ffv1") from None
    if formats and pix_fmt not in formats:
        raise ValueError(f"pix_fmt: {codec} does not encode {pix_fmt!r}; it takes "
                         f"{', '.join(sorted(formats))}")


class CheckpointError(UsageError):
    """A --checkpoint that is not a training run or an export."""


MODEL_MARKERS = ({"config.json", "model.safetensors"}, {"model_index.json"},
                 {"tubelet_lora.json"})


def remote_export(checkpoint: str, storage: StorageConfig | None = None) -> tuple[Path, Store]:
    """An object-store run, export or pipeline folder -> (its local copy, the model folder's
    Store): the model folder is copied once per node (`local_copy`) and loaded from there."""
    try:
        store = locate(checkpoint, "--checkpoint", storage, must_exist=True)
        for candidate in (store, store.child("export")):
            names = {f.name for f in candidate.files(recursive=False)}
            if any(m <= names for m in MODEL_MARKERS):
                return local_copy(candidate).resolve(), candidate
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"--checkpoint {checkpoint}: {storage_reason(e)}") from None
    raise CheckpointError(f"--checkpoint {checkpoint}: not a training run, an export or a "
                          "diffusers pipeline folder (no config.json + model.safetensors, "
                          "model_index.json or tubelet_lora.json there or in export/)")


def resolve_export(checkpoint: str | Path) -> Path:
    """A run folder (RUN, holding export/), an export folder, or a diffusers pipeline folder
    (model_index.json; a fine-tune's RUN/export is one, or a LoRA export of one) -> the model
    folder."""
    if is_uri(checkpoint):
        return remote_export(str(checkpoint))[0]
    path = Path(checkpoint)
    for candidate in (path, path / "export"):  # RUN/export: a DiT's, or a fine-tune's
        if model_kind(candidate):
            return candidate.resolve()
    raise CheckpointError(f"--checkpoint {checkpoint}: not a training run, an export or a "
                          "diffusers pipeline folder (needs config.json and model.safetensors, "
                          "in the folder or in its export/, as `tubelet train` writes "
                          "RUN/export; or model_index.json, as save_pretrained writes)")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Model:
    """What the driver checks about the model before any Ray work."""

    export: Path  # the model folder: a tubelet export or a diffusers pipeline folder
    digest: str
    record: ExportRecord | PipelineRecord
    vae: str  # the VAE the decode stage loads (resolved from `auto`)
    grid: Grid
    temporal: int
    spatial: int
    # where `export` was copied from (an object store), so a node without the copy makes it
    source: Store | None = None


def model_record(export: Path) -> tuple[ExportRecord | PipelineRecord, str, int, tuple]:
    """(record, digest, latent channels, patch) of a model folder, checked from its headers
    alone: a pickle (or anything else) posing as weights stops here, unloaded."""
    try:
        if model_kind(export) == "diffusers":
            record = read_pipeline(export)
            return record, pipeline_digest(record), record.latent_channels, record.patch
        record = read_export(export)
    except (ExportError, PipelineError) as e:
        raise CheckpointError(str(e)) from None
    return (record, digest(export / "model.safetensors"), record.dit.in_channels,
            tuple(record.dit.patch))


def inspect_model(checkpoint: str | Path, vae: VAEStageConfig,
                  storage: StorageConfig | None = None) -> Model:
    """`vae.checkpoint: auto`: a pipeline folder's own VAE; for a DiT, the VAE its training
    latents came from (as its export records it) if that file is here, else the shipped one.
    A VAE that normalises latents otherwise than the DiT's training latents is refused.
    An object-store checkpoint is copied to this node first (`remote_export`)."""
    source = None
    if is_uri(checkpoint):
        export, source = remote_export(str(checkpoint), storage)
    else:
        export = resolve_export(checkpoint)
    record, model_digest, channels, (pt, ph, pw) = model_record(export)
    latents = (record.train.get("latents") or {}) if isinstance(record, ExportRecord) else {}
    path = vae.checkpoint
    if path == "auto":
        if isinstance(record, PipelineRecord):
            path = str(vae_folder(record))
        else:
            recorded = latents.get("vae", "")
            path = (recorded if recorded and (is_uri(recorded) or Path(recorded).is_file())
                    else SHIPPED_VAE)
    try:
        model = load_checkpoint_vae(path)
    except VAELoadError as e:
        raise ConfigError(str(e)) from None
    if model.latent_channels != channels:
        what = "transformer" if isinstance(record, PipelineRecord) else "DiT"
        raise ConfigError(f"VAE {path} makes {model.latent_channels}-channel latents "
                          f"but the {what} of {export} takes {channels}; pass the VAE the "
                          "training data was preprocessed with (vae.checkpoint)")
    check_normalisation(model, latents, export, path)
    s, t = model.spatial_factor, model.temporal_factor
    return Model(export, model_digest, record, path,
                 Grid(spatial=math.lcm(s * ph, s * pw), temporal=t, patch_t=pt), t, s, source)


def check_normalisation(vae: Any, latents: dict[str, Any], export: Path, path: str) -> None:
    """The VAE `path` must scale latents as the VAE of the DiT's training data did (exports
    without the record, from before it was kept, are not checked)."""
    want = [latents.get("scaling_factor") or [], latents.get("shift_factor") or []]
    if not want[0]:
        return
    have = [as_floats(v) for v in (vae.scaling_factor, vae.shift_factor)]
    if any(len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=1e-8)
           for a, b in zip(have, want, strict=True)):
        raise ConfigError(
            f"VAE {path} normalises latents otherwise than the VAE the DiT of {export} was "
            f"trained with ({latents.get('vae') or 'unnamed'}: scaling {fmt_floats(want[0])}, "
            f"shift {fmt_floats(want[1])}; this one: {fmt_floats(have[0])}, "
            f"{fmt_floats(have[1])}); decode with that VAE (vae.checkpoint) or retrain on "
            "latents of this one")


def fmt_floats(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values[:3]) + (", ..." if len(values) > 3 else "")


def read_done(out: Path | Store) -> set[str]:
    """Ids in the manifest whose video file exists."""
    out = as_store(out)
    parts = parquet_files(out.child("manifest"))
    if not parts:
        return set()
    table = pds.dataset([p.path for p in parts], filesystem=parts[0].fs).to_table(
        columns=["id", "file"])
    videos = {f.path for f in out.child("videos").files()}
    return {i for i, f in zip(table.column("id").to_pylist(), table.column("file").to_pylist(),
                              strict=True) if out.child(*Path(f).parts).path in videos}


def read_manifest(out: Path | Store) -> list[dict[str, Any]]:
    parts = parquet_files(as_store(out).child("manifest"))
    if not parts:
        return []
    # parts written before a column existed (`latents`) read as null there
    rows = pa.concat_tables([pq.read_table(p.path, filesystem=p.fs) for p in parts],
                            promote_options="default").to_pylist()
    latest: dict[str, dict] = {}
    for r in rows:  # a rerun after a crash between mp4 and manifest may repeat an id
        latest[r["id"]] = r
    return sorted(latest.values(), key=lambda r: r["id"])


def generate_stages(cfg: GenerateConfig, model: Model, out: Path | Store, gpus: bool
                    ) -> list[StageSpec]:
    """The generation graph: text encode -> sample -> VAE decode -> mp4 encode. `gpus`: the
    cluster has GPUs (the sampler then asks for one). `out`: a folder or an object store."""
    export, out = str(model.export), as_store(out)
    specs = [TextEncodeStage.spec(cfg, export, model.source),
             SampleStage.spec(cfg, export, model.temporal, model.spatial, gpus, model.source),
             VAEDecodeStage.spec(cfg, out if cfg.save_latents else "", model.source,
                                 str(model.export)),
             Mp4EncodeStage.spec(cfg, out)]
    if cfg.share_processes:
        return [chain("sample", specs[:2]), chain("decode", specs[2:])]
    return specs


def prompt_file(prompts: str | Path, storage: StorageConfig | None = None) -> str | Path:
    """A prompt file in an object store is read from a local copy (`local_copy`)."""
    if not is_uri(prompts):
        return prompts
    try:
        return local_copy(locate(prompts, "--prompts", storage, must_exist=True))
    except StorageError as e:
        raise PromptError(str(e)) from None
    except OSError as e:
        raise PromptError(f"--prompts {prompts}: {storage_reason(e)}") from None


def prompt_dataset(rows: list[dict]):
    """The prompt rows as a lazy Ray Dataset, a block per video, sorted so that rows of one
    shape and setting meet in the sampler's batches."""
    import ray.data

    rows = sorted(rows, key=lambda r: (r["height"], r["width"], r["frames"], r["steps"],
                                       r["cfg"], r["id"]))
    return ray.data.from_items(rows, override_num_blocks=len(rows))


def write_manifest_part(out: Path | Store, batch: pa.Table) -> None:
    write_atomic(batch.select(list(MANIFEST_COLUMNS)),
                 as_store(out).child("manifest", f"part-{uuid.uuid4().hex}.parquet"))


def write_gallery(out: Path | Store, rows: list[dict[str, Any]]) -> Store:
    """DIR/index.html: every video plays (muted, looped), with its prompt and settings."""
    cards = []
    for r in rows:
        settings = (f"{r['width']}x{r['height']}, {r['frames']} frames at {r['fps']:g} fps, "
                    f"seed {r['seed']}, {r['steps']} steps, cfg {r['cfg']:g}")
        neg = (f"<p class=neg>not: {html.escape(r['negative_prompt'])}</p>"
               if r["negative_prompt"] else "")
        cards.append(
            f"<figure><video src=\"{html.escape(r['file'])}\" autoplay loop muted playsinline "
            f"controls></video><figcaption><b>{html.escape(r['prompt'])}</b>{neg}"
            f"<p>{html.escape(settings)}</p><p class=id>{html.escape(r['id'])} · "
            f"<a href=\"{html.escape(r['sheet'])}\">frames</a></p></figcaption></figure>")
    page = (
        "<!doctype html><meta charset=utf-8><title>tubelet generate</title><style>"
        "body{font-family:sans-serif;margin:1em;background:#fafafa}"
        "figure{display:inline-block;vertical-align:top;margin:.5em;width:260px}"
        "video{width:256px;background:#000;image-rendering:pixelated}"
        "p{margin:.2em 0;font-size:12px;color:#444}.id{color:#999}.neg{color:#a44}</style>"
        f"<h1>{len(rows)} videos</h1>" + "".join(cards))
    path = as_store(out).child("index.html")
    path.write_text(page)  # whole: a rename, or one PUT
    return path


def run_generate(cfg: GenerateConfig, checkpoint: str | Path, prompts: str | Path,
                 output: str | Path, address: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Raises a UsageError (checkpoint, VAE, prompt file) before starting Ray."""
    from ray.data import DataContext

    from pipeline.ray_train import no_progress_bars

    start = time.perf_counter()
    model = inspect_model(checkpoint, cfg.vae, cfg.storage)
    cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=model.vae))
    rows = read_prompts(prompt_file(prompts, cfg.storage), cfg.defaults, model.grid)
    out = resolve(output, cfg.storage)  # checked (and made) once the rows are
    K = cfg.sampler.sequence_parallel
    record = model.record
    if isinstance(record, PipelineRecord) and not record.family.parallel and (
            K > 1 or cfg.sampler.cfg_parallel):
        raise ConfigError(f"{record.pipeline} folders sample on one rank: sequence / CFG "
                          "parallel is not supported for them yet; drop --sequence-parallel "
                          "and --cfg-parallel")
    if isinstance(record, PipelineRecord) and K > 1 and cfg.sampler.cache.enabled:
        raise ConfigError("step caching of a pipeline folder (diffusers' FirstBlockCache) "
                          "decides per rank, which a sequence-parallel group cannot follow; "
                          "drop --cache or --sequence-parallel")
    small = min(rows, key=model.grid.tokens)
    if K > (tokens := model.grid.tokens(small)):
        raise ConfigError(f"sampler.sequence_parallel={K} is more ranks than the "
                          f"{tokens} tokens of prompt {small['id']!r} "
                          f"({small['frames']}x{small['height']}x{small['width']}); lower "
                          "--sequence-parallel or make the video larger")

    def graph(c: GenerateConfig) -> list[StageSpec]:
        cluster = cluster_of(address, c.ray.num_cpus)
        return generate_stages(c, model, out, gpus=bool(cluster and cluster.gpus > 0))

    cfg = sized("generate", cfg, graph, address)  # pools + sampler ranks, before Ray starts
    for r in rows:
        r.update(checkpoint=redact(str(model.source or model.export)),
                 checkpoint_digest=model.digest)
    out = output_store(output, cfg.storage)
    done = read_done(out)
    todo = [r for r in rows if r["id"] not in done]
    written, arrivals = 0, []
    if todo:
        with ray_session(address, cfg.ray):
            ctx = DataContext.get_current()
            no_progress_bars(ctx)  # one line per video instead
            # One block per batch a stage returns: a task's outputs are otherwise merged up to
            # 128 MiB before they move on, so a video would wait for the rest of its input
            # block (measured: all 12 videos of a job reached the driver at once, at the end).
            ctx.target_max_block_size = 1
            cfg = sized("generate", cfg, graph, address)  # a joined cluster's own size
            ds = apply_all(prompt_dataset(todo), graph(cfg))
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                write_manifest_part(out, batch)
                written += batch.num_rows
                arrivals.append(time.perf_counter() - start)
                if progress:
                    print(f"[generate] {written}/{len(todo)} videos, "
                          f"{time.perf_counter() - start:.0f}s", flush=True)
    manifest = read_manifest(out)
    write_gallery(out, manifest)
    wall = time.perf_counter() - start
    seconds = {k: round(sum(r[k] for r in manifest if r["id"] in {t["id"] for t in todo}), 2)
               for k in ("text_seconds", "sample_seconds", "decode_seconds", "encode_seconds")}
    summary = {"prompts": len(rows), "generated": written, "already_done": len(rows) - len(todo),
               "videos": len(manifest), "wall_seconds": round(wall, 2),
               "videos_per_minute": round(60 * written / wall, 2) if written else None,
               "first_video_seconds": round(arrivals[0], 2) if arrivals else None,
               "last_video_seconds": round(arrivals[-1], 2) if arrivals else None,
               "stage_busy_seconds": seconds,
               "checkpoint": redact(str(model.source or model.export)),
               "checkpoint_digest": model.digest, "gallery": str(out.child("index.html")),
               "config": to_dict(cfg)}
    out.child("summary.json").write_text(redact(json.dumps(summary, indent=2)))
    write_run_record(out, "generate", cfg, prompts=redact(str(prompts)),
                     checkpoint=redact(str(model.source or model.export)), generated=written)
    return summary
