"""`tubelet eval-vae`: reconstruction quality of a VAE checkpoint on videos (PSNR, SSIM).

    tubelet eval-vae --input VIDEOS [--vae CKPT] [--output DIR] [--videos] [--address ADDR]

`--vae CKPT` is `--set checkpoint=CKPT` (default: configs/eval-vae/default.yaml's, the shipped
VAE): a `train-vae` .safetensors file or a local diffusers video-VAE folder. Videos of any
size, aspect ratio and length become clips by the bucket rules of the config's
`preprocess.buckets` (`clip_stages`: the same probe -> assign -> decode actor pools as
`preprocess` and `train-vae`), then a `VAEEvalStage` pool encodes, decodes and measures each
clip (actors/vae_eval.py has the metric definitions). Per video: the mean over its clips; overall:
the mean over videos (and over clips, also reported). Output in DIR: eval.json (overall, per
video, per clip, config, checkpoint), eval.md (the table printed on stdout), errors/,
videos/*.mp4 with --videos (h264 reconstructions). Without --output only the table is printed.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.dataset as pds

from actors.common.stage import StageResources, StageSpec
from actors.common.storage import Store, as_store, filesystem_of, redact
from actors.common.vae import load_checkpoint_vae, resolve_checkpoint
from actors.vae_eval import VAEEvalStage
from actors.write import parquet_files
from pipeline.config import UsageError, output_store, to_dict, write_run_record
from pipeline.pools import sized
from pipeline.ray_train import keep_order, no_progress_bars
from pipeline.report import eval_table
from pipeline.runtime import RayConfig, ray_session
from pipeline.sources import list_sources
from pipeline.streams import ClipConfig, clip_stages, stream


@dataclass
class VAEEvalConfig:
    """The reconstruction pool and its settings (the `eval:` section)."""

    stage: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=4))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tile_px: int = 0  # > 0: tiled encode/decode (bounded memory for large frames)
    crf: int = 18  # h264 quality of the reconstructed mp4s (--videos)

    def validate(self) -> None:
        if self.tile_px < 0 or not 0 <= self.crf <= 51:
            raise ValueError("tile_px: must be >= 0; crf: must be in [0, 51]")


@dataclass
class EvalVAEConfig:
    """configs/eval-vae/*.yaml."""

    # --vae: a save_vae() safetensors file or a diffusers video-VAE folder (actors/common/vae.py)
    checkpoint: str = "weights/vae-dc.safetensors"
    preprocess: ClipConfig = field(default_factory=ClipConfig)  # buckets, decode pools
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: give a VAE checkpoint (--vae CKPT: a .safetensors "
                             "file written by `tubelet train-vae` or a diffusers VAE folder)")


def eval_vae_stages(cfg: EvalVAEConfig, checkpoint: str, out: Path | Store,
                    videos_dir: Any = "", fs: Any = None) -> list[StageSpec]:
    """The eval-vae graph: `clip_stages` + the reconstruct-and-measure stage (`out` and
    `videos_dir` may be in an object store; `fs`: the input videos' filesystem)."""
    errors = as_store(out).child("errors")
    return [*clip_stages(cfg.preprocess, errors, fs=fs),
            VAEEvalStage.spec(cfg, checkpoint, errors, videos_dir)]


class EvalError(UsageError):
    """A checkpoint that cannot be evaluated; the message is one line for the user."""


def summarize(clips: list[dict], vae: str, factors: str) -> dict[str, Any]:
    by_video: dict[str, list[dict]] = defaultdict(list)
    for c in clips:
        by_video[c["path"]].append(c)
    videos = [{"path": p, "clips": len(cs), "frames": sum(c["num_frames"] for c in cs),
               "size": f"{cs[0]['width']}x{cs[0]['height']}",
               "psnr": float(np.mean([c["psnr"] for c in cs])),
               "ssim": float(np.mean([c["ssim"] for c in cs]))}
              for p, cs in sorted(by_video.items())]
    overall = {
        "videos": len(videos), "clips": len(clips),
        "frames": sum(c["num_frames"] for c in clips),
        "psnr": float(np.mean([v["psnr"] for v in videos])) if videos else None,
        "ssim": float(np.mean([v["ssim"] for v in videos])) if videos else None,
        "psnr_clip_mean": float(np.mean([c["psnr"] for c in clips])) if clips else None,
        "ssim_clip_mean": float(np.mean([c["ssim"] for c in clips])) if clips else None,
    }
    return {"vae": vae, "compression": factors, "overall": overall, "per_video": videos,
            "per_clip": sorted(clips, key=lambda c: (c["path"], c["start"]))}


def run_eval_vae(cfg: EvalVAEConfig, src: str, output: str | Path | None = None,
                 videos: bool = False, address: str | None = None) -> dict[str, Any]:
    """Raises EvalError (bad checkpoint) or SourceError (bad input) before starting Ray."""
    from ray.data import DataContext

    if videos and output is None:
        raise EvalError("--videos needs --output DIR (the mp4s go to DIR/videos)")
    vae = cfg.checkpoint
    start = time.perf_counter()
    try:
        model = load_checkpoint_vae(vae)  # a bad path or file fails here, in one line
    except ValueError as e:
        raise EvalError(str(e)) from None
    factors = f"{model.temporal_factor}x{model.spatial_factor}x{model.spatial_factor}"
    del model
    storage = cfg.preprocess.storage
    sources = list_sources(src, tuple(cfg.preprocess.video_extensions), storage)
    fs = filesystem_of([src], storage)
    scratch = None
    if output is None:
        scratch = tempfile.TemporaryDirectory(prefix="tubelet-eval-")
    out = output_store(output if output is not None else scratch.name, storage)
    videos_dir = out.child("videos") if videos else ""
    checkpoint = resolve_checkpoint(vae)

    def graph(c: EvalVAEConfig) -> list[StageSpec]:
        return eval_vae_stages(c, checkpoint, out, videos_dir, fs)

    cfg = sized("eval-vae", cfg, graph, address)  # before Ray
    clips: list[dict] = []
    with ray_session(address, cfg.ray):
        cfg = sized("eval-vae", cfg, graph, address)  # a joined cluster's own size
        keep_order(DataContext.get_current())
        no_progress_bars(DataContext.get_current())
        ds = stream(cfg.preprocess, sources, graph(cfg))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            clips.extend(batch.to_pylist())
    report = summarize(clips, str(vae), factors)
    errors = parquet_files(out.child("errors"))
    report["errors"] = (pds.dataset([e.path for e in errors], filesystem=errors[0].fs)
                        .to_table().to_pylist() if errors else [])
    report["inputs"] = sources.num_rows
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    report["config"] = {"preprocess": {"buckets": to_dict(cfg.preprocess.buckets)},
                        "eval": to_dict(cfg.eval)}
    if scratch is not None:
        scratch.cleanup()
    else:
        out.child("eval.json").write_text(redact(json.dumps(report, indent=2)))
        out.child("eval.md").write_text(eval_table(report) + "\n")
        write_run_record(out, "eval-vae", cfg, input=redact(src), vae=str(vae), videos=videos,
                         overall=report["overall"], wall_seconds=report["wall_seconds"])
    return report
