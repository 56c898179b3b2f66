"""`tubelet eval-vae`: reconstruction quality of a VAE checkpoint on videos (PSNR, SSIM).

    tubelet eval-vae --vae CKPT --input VIDEOS [--output DIR] [--videos] [--address ADDR]

Videos of any size, aspect ratio and length become clips by the bucket rules of the config's
`preprocess.buckets` (the same probe -> assign -> decode actor pools as `preprocess` and
`train-vae`), then a `VAEEvalStage` pool encodes, decodes and measures each clip
(actors/vae_eval.py has the metric definitions). Per video: the mean over its clips; overall:
the mean over videos (and over clips, also reported). Output in DIR: eval.json (overall, per
video, per clip, config, checkpoint), eval.md (the table printed on stdout), errors/,
videos/*.mp4 with --videos (h264 reconstructions). Without --output only the table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pds

from actors.vae_eval import VAEEvalStage, load_eval_vae
from pipeline.config import ConfigError, to_dict, write_run_record
from pipeline.runtime import check_budget, init_ray
from pipeline.sources import SourceError, list_sources
from pipeline.train import quiet
from pipeline.train_vae import TrainVAEConfig, clip_stream, resolve_vae_config


class EvalError(ValueError):
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


def table(report: dict[str, Any]) -> str:
    """Markdown table: one line per video, then the overall line."""
    lines = ["| video | size (bucket px) | clips | frames | PSNR (dB) | SSIM |",
             "|---|---|---:|---:|---:|---:|"]
    for v in report["per_video"]:
        lines.append(f"| {Path(v['path']).name} | {v['size']} | {v['clips']} | {v['frames']} "
                     f"| {v['psnr']:.2f} | {v['ssim']:.4f} |")
    o = report["overall"]
    if o["videos"]:
        lines.append(f"| **overall** (mean of {o['videos']} videos) | | {o['clips']} | "
                     f"{o['frames']} | **{o['psnr']:.2f}** | **{o['ssim']:.4f}** |")
    return "\n".join(lines)


def run_eval_vae(cfg: TrainVAEConfig, vae: str, src: str, output: str | Path | None = None,
                 videos: bool = False, address: str | None = None) -> dict[str, Any]:
    """Raises EvalError (bad checkpoint) or SourceError (bad input) before starting Ray."""
    import ray
    from ray.data import DataContext

    start = time.perf_counter()
    try:
        model = load_eval_vae(vae)  # a bad path or file fails here, in one line
    except ValueError as e:
        raise EvalError(str(e)) from None
    factors = f"{model.temporal_factor}x{model.spatial_factor}x{model.spatial_factor}"
    del model
    sources = list_sources(src, tuple(cfg.preprocess.video_extensions))
    scratch = None
    if output is None:
        scratch = tempfile.TemporaryDirectory(prefix="tubelet-eval-")
    out = Path(output) if output is not None else Path(scratch.name)
    out.mkdir(parents=True, exist_ok=True)
    videos_dir = out / "videos" if videos else None
    if videos_dir is not None:
        videos_dir.mkdir(exist_ok=True)
    p = cfg.preprocess
    stages = {"probe": p.probe, "assign": p.assign, "decode": p.decode, "eval": cfg.eval.stage}
    started = init_ray(address, cfg.ray)
    clips: list[dict] = []
    try:
        if started and not address:
            check_budget(stages)
        quiet(DataContext.get_current())
        ds = clip_stream(p, sources, out / "errors").map_batches(
            VAEEvalStage, **cfg.eval.stage.map_batches_kwargs(
                checkpoint=str(Path(vae).resolve()), buckets=p.buckets,
                errors_dir=str(out / "errors"), device=cfg.eval.device,
                tile_px=cfg.eval.tile_px, videos_dir=str(videos_dir or ""), crf=cfg.eval.crf,
                num_cpus=cfg.eval.stage.num_cpus))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            clips.extend(batch.to_pylist())
    finally:
        if started:
            ray.shutdown()
    report = summarize(clips, str(vae), factors)
    errors = sorted((out / "errors").glob("*.parquet"))
    report["errors"] = (pds.dataset(errors).to_table().to_pylist() if errors else [])
    report["inputs"] = sources.num_rows
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    report["config"] = {"preprocess": {"buckets": to_dict(p.buckets)},
                        "eval": to_dict(cfg.eval)}
    if scratch is not None:
        scratch.cleanup()
    else:
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        (out / "eval.md").write_text(table(report) + "\n")
        write_run_record(out, "eval-vae", cfg, input=src, vae=str(vae), videos=videos,
                         overall=report["overall"], wall_seconds=report["wall_seconds"])
    return report


def register_eval_vae(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-vae",
        help="PSNR and SSIM of a VAE checkpoint on videos, per video and overall",
        description="Cut videos of any size into clips by the bucket rules (config: "
        "preprocess.buckets), reconstruct them with the VAE in an actor pool and report "
        "PSNR and SSIM per clip, per video and overall (DIR/eval.json, DIR/eval.md and a "
        "table on stdout). Config: configs/vae/*.yaml (sections preprocess, eval, ray).",
    )
    p.add_argument("--vae", required=True,
                   help="VAE checkpoint (.safetensors written by train-vae)")
    p.add_argument("--input", required=True,
                   help="videos: a folder (recursive), a glob, or a .jsonl/.csv/.parquet manifest")
    p.add_argument("--output", default=None, type=Path,
                   help="write eval.json, eval.md, errors/ (and videos/) here")
    p.add_argument("--videos", action="store_true",
                   help="also write each reconstruction as an h264 mp4 in DIR/videos")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(run=run_eval_vae_command)


def run_eval_vae_command(args: argparse.Namespace) -> int:
    cfg = resolve_vae_config(args, {})
    if args.videos and args.output is None:
        raise ConfigError("--videos needs --output DIR (the mp4s go to DIR/videos)")
    try:
        report = run_eval_vae(cfg, args.vae, args.input, args.output, args.videos,
                              args.address)
    except (EvalError, SourceError) as e:
        print(f"tubelet eval-vae: {e}", file=sys.stderr)
        return 2
    print(table(report))
    o = report["overall"]
    where = f"; {args.output}/eval.json" if args.output else ""
    print(f"{o['videos']} videos, {o['clips']} clips, {len(report['errors'])} errors or skips, "
          f"{report['compression']} VAE; {report['wall_seconds']}s{where}")
    return 0 if o["videos"] else 1

