"""The `tubelet` command line: all of its argparse, exit codes and error printing.

Each subcommand is a pair in COMMANDS: `add_<command>(sub)` declares its flags and
`run_<command>(args)` loads its config and calls its module (pipeline/<command>.py), which
knows nothing of argparse. Every subcommand takes `--config FILE` (a YAML file of its config
dataclass; default `configs/<command>/default.yaml`) and repeated `--set dotted.key=value`
overrides; its own flags (e.g. `--num-videos`, `--vae`) are config keys too and apply last.

Exit status: 0 done; 2 bad input the user can fix (any `pipeline.config.UsageError`: a config
key or value, an input path, a dataset, an occupied output), one line on stderr; 1 training
that failed more often than `max_failures` allows (`TrainFailed`), or eval-vae with no video.
torch and Ray are imported by the command that runs, so `tubelet --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UsageError, resolve_config, unwritable, write_run_record

Sub = argparse._SubParsersAction


def config(cls: type, args: argparse.Namespace, **flags: Any):
    """The command's config: --config (or its default file) <- --set <- its own flags."""
    return resolve_config(cls, args.command, args.config, args.set or [], flags)


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a training run: its folder, worker count, resume, cluster."""
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--workers", type=int, help="Ray Train workers (config: num_workers)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint")
    add_address(p)


INPUT_HELP = "videos: a folder (recursive), a glob, or a .jsonl/.csv/.parquet manifest"


# ---------------------------------------------------------------------------------------------
# synth


def add_synth(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synth",
        help="write the embedded default dataset: captioned synthetic mp4 videos",
        description="Write N real h264 mp4 videos of coloured shapes moving over plain or "
        "textured backgrounds, in several sizes, aspect ratios and frame rates, plus "
        "DIR/captions.jsonl (caption and ground truth per video).",
    )
    p.add_argument("--output", required=True, help="directory to write videos to")
    p.add_argument("--num-videos", type=int, help="number of videos (config: num_videos)")
    p.add_argument("--seed", type=int, help="random seed; same seed, same dataset (config: seed)")
    p.add_argument("--kind", choices=["shapes", "photos"],
                   help="shapes (default) or photos: pans and zooms over scikit-image's natural "
                   "photos (config: kind)")
    p.add_argument("--photo-split", choices=["train", "held-out"],
                   help="which photos --kind photos uses; the two sets are disjoint "
                   "(config: photo_split)")
    return p


def run_synth(args: argparse.Namespace) -> int:
    from actors.common.storage import as_store
    from pipeline.synth import SynthConfig, synthesize

    cfg = config(SynthConfig, args, num_videos=args.num_videos, seed=args.seed, kind=args.kind,
                 photo_split=args.photo_split)
    start = time.perf_counter()
    rows = synthesize(cfg, args.output)
    seconds = time.perf_counter() - start
    write_run_record(as_store(args.output, cfg.storage), "synth", cfg, videos=len(rows),
                     wall_seconds=round(seconds, 2))
    ratios = sorted({f"{r['width']}x{r['height']}" for r in rows})
    print(f"wrote {len(rows)} videos to {args.output} in {seconds:.1f}s "
          f"({len(rows) / seconds * 60:.0f}/min); sizes: {', '.join(ratios)}")
    return 0


# ---------------------------------------------------------------------------------------------
# preprocess


def add_preprocess(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "preprocess",
        help="videos -> probe -> buckets -> PyAV decode -> VAE encode -> latent Parquet",
        description="Stream videos through Ray Data actor pools into a Parquet latent dataset "
        "(DIR/latents), an errors table (DIR/errors) and DIR/summary.json. Rerunning the same "
        "command resumes: clips already written are skipped.",
    )
    p.add_argument("--input", required=True,
                   help="a folder of videos (recursive; uses captions.jsonl beside them), a glob, "
                   "or a .jsonl/.csv/.parquet manifest with a 'path' column")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--vae", default=None, help="VAE checkpoint (safetensors from train-vae, or "
                   "a local diffusers video-VAE folder); the same as --set vae.checkpoint=CKPT")
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help="a diffusers pipeline folder (Wan): latents from its VAE and caption "
                   "features from its text encoder, for `train --init FOLDER` (config: model)")
    add_address(p)
    return p


def run_preprocess(args: argparse.Namespace) -> int:
    from pipeline.preprocess import run_preprocess
    from pipeline.report import print_preprocess_summary
    from pipeline.streams import PreprocessConfig

    cfg = config(PreprocessConfig, args, **{"vae.checkpoint": args.vae, "model": args.model})
    summary = run_preprocess(cfg, args.input, args.output, address=args.address)
    print_preprocess_summary(summary)
    return 0


# ---------------------------------------------------------------------------------------------
# train-vae, eval-vae


def add_train_vae(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-vae",
        help="train the causal 3D VAE on Ray Train, fed by the decode stages",
        description="Stream videos through probe, bucket and decode actor pools into Ray Train "
        "workers (DDP) that train the video VAE on random crops. Validation loss on held-out "
        "clips, checkpoints, RUN/metrics.jsonl, RUN/loss.png, RUN/recon.png and the trained "
        "VAE in RUN/export/vae.safetensors.",
    )
    p.add_argument("--input", required=True, help=INPUT_HELP)
    p.add_argument("--val", default=None,
                   help="held-out videos (default: data.val_videos videos of --input)")
    add_run_flags(p)
    return p


def run_train_vae(args: argparse.Namespace) -> int:
    from pipeline.train_vae import TrainVAEConfig, run_train_vae

    cfg = config(TrainVAEConfig, args, num_workers=args.workers)
    summary = run_train_vae(cfg, args.input, args.output, val_src=args.val,
                            resume=args.resume, address=args.address)
    print(f"trained {summary['steps']} steps in {summary['wall_seconds']}s; held-out "
          f"PSNR {summary['held_out_psnr']:.2f} dB, SSIM {summary['held_out_ssim']:.4f}; "
          f"VAE in {summary['export']}")
    return 0


def add_eval_vae(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval-vae",
        help="PSNR and SSIM of a VAE checkpoint on videos, per video and overall",
        description="Cut videos of any size into clips by the bucket rules (config: "
        "preprocess.buckets), reconstruct them with the VAE in an actor pool and report "
        "PSNR and SSIM per clip, per video and overall (DIR/eval.json, DIR/eval.md and a "
        "table on stdout). Config: configs/eval-vae/*.yaml.",
    )
    p.add_argument("--vae", default=None,
                   help="VAE checkpoint (.safetensors written by train-vae, or a local "
                   "diffusers video-VAE folder); the same as --set checkpoint=CKPT "
                   "(default: the shipped VAE)")
    p.add_argument("--input", required=True, help=INPUT_HELP)
    p.add_argument("--output", default=None,
                   help="write eval.json, eval.md, errors/ (and videos/) here")
    p.add_argument("--videos", action="store_true",
                   help="also write each reconstruction as an h264 mp4 in DIR/videos")
    add_address(p)
    return p


def run_eval_vae(args: argparse.Namespace) -> int:
    from pipeline.eval_vae import EvalVAEConfig, run_eval_vae
    from pipeline.report import eval_table

    cfg = config(EvalVAEConfig, args, checkpoint=args.vae)
    report = run_eval_vae(cfg, args.input, args.output, args.videos, args.address)
    print(eval_table(report))
    o = report["overall"]
    where = f"; {args.output}/eval.json" if args.output else ""
    print(f"{o['videos']} videos, {o['clips']} clips, {len(report['errors'])} errors or skips, "
          f"{report['compression']} VAE; {report['wall_seconds']}s{where}")
    return 0 if o["videos"] else 1


# ---------------------------------------------------------------------------------------------
# train


def add_train(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train the DiT on Ray Train: FSDP2 workers fed by Ray Data",
        description="Train a video DiT (and its text encoder) with FSDP2-sharded Ray Train "
        "workers. Sharded checkpoints every checkpoint_every steps, an exported EMA model in "
        "RUN/export, metrics in RUN/metrics.jsonl and RUN/loss.png. model.in_channels comes "
        "from the data (the latents' channels).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="latent dataset (DIR/latents of preprocess)")
    src.add_argument("--input", help="videos: stream them through decode + VAE into training "
                     "(no latent copy; config section 'preprocess')")
    p.add_argument("--init", default=None, metavar="FOLDER",
                   help="fine-tune this diffusers pipeline folder's transformer (Wan) on "
                   "latents of `preprocess --model FOLDER` (config: finetune.init)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="with --init: train LoRA adapters of this rank, not every weight "
                   "(config: finetune.lora.rank)")
    add_run_flags(p)
    return p


def run_train(args: argparse.Namespace) -> int:
    from pipeline.train import TrainConfig, run_train

    if args.lora is not None and args.lora < 1:
        raise UsageError(f"--lora {args.lora}: the LoRA rank must be >= 1 (leave --lora out "
                         "to fine-tune every weight)")
    if args.lora is not None and not args.init:
        raise UsageError("--lora needs --init FOLDER (the pipeline whose transformer gets "
                         "the adapters)")
    cfg = config(TrainConfig, args, num_workers=args.workers,
                 **{"finetune.init": args.init, "finetune.lora.rank": args.lora})
    summary = run_train(cfg, args.output, data=args.data, input_src=args.input,
                        resume=args.resume, address=args.address)
    print(f"trained {summary['steps']} steps in {summary['wall_seconds']}s; final loss "
          f"{summary['final_loss']:.4f}; EMA model in {summary['export']}")
    return 0


# ---------------------------------------------------------------------------------------------
# generate


def add_generate(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="prompts -> text encode -> DiT sampler -> VAE decode -> mp4 files + gallery",
        description="Batch offline generation as a Ray Data job: one mp4 per prompt row in "
        "DIR/videos, a Parquet manifest in DIR/manifest, contact sheets and DIR/index.html. "
        "FILE is .txt (one prompt per line) or .jsonl/.csv/.parquet with 'prompt' and optional "
        "per-row id, height, width, frames, fps, seed, steps, cfg, negative_prompt; the flags "
        "below are the defaults of rows that give none. Rerunning skips ids already done.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="a training run folder (RUN), its export (RUN/export), or a local "
                   "diffusers pipeline folder (model_index.json; Wan 2.1 T2V, Wan 2.2 "
                   "TI2V-5B, CogVideoX: text-to-video)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompt file")
    p.add_argument("--output", required=True, help="output directory")
    for flag, kind, what in (("height", int, "pixels"), ("width", int, "pixels"),
                             ("frames", int, "1 + 4k"), ("fps", float, "frames per second"),
                             ("steps", int, "Euler steps"), ("cfg", float, "guidance scale"),
                             ("seed", int, "noise seed")):
        p.add_argument(f"--{flag}", type=kind,
                       help=f"{what} (config: defaults.{flag})")
    p.add_argument("--sequence-parallel", type=int, metavar="K",
                   help="one video's tokens across K ranks (config: sampler.sequence_parallel)")
    p.add_argument("--cfg-parallel", action="store_true", default=None,
                   help="conditional and unconditional halves on two ranks "
                   "(config: sampler.cfg_parallel)")
    p.add_argument("--cache", action="store_true", default=None,
                   help="step caching: skip a step's blocks after the first when the first "
                   "block's output barely moved (config: sampler.cache.enabled, threshold "
                   "sampler.cache.threshold, default 0.1)")
    p.add_argument("--vae", default=None, help="VAE checkpoint the latents were made with (a "
                   ".safetensors file or a diffusers VAE folder); the same as "
                   "--set vae.checkpoint=CKPT (default: a pipeline folder's own VAE; for a "
                   "DiT, the VAE its export records, else the shipped VAE; one that "
                   "normalises latents otherwise than the DiT's training data is refused)")
    p.add_argument("--save-latents", action="store_true", default=None,
                   help="also write each row's latents before decode as DIR/latents/<name>.npy "
                   "(config: save_latents)")
    add_address(p)
    return p


def run_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import GenerateConfig, run_generate

    flags = {f"defaults.{k}": getattr(args, k)
             for k in ("height", "width", "frames", "fps", "steps", "cfg", "seed")}
    cfg = config(GenerateConfig, args, **flags, **{
        "sampler.sequence_parallel": args.sequence_parallel,
        "sampler.cfg_parallel": args.cfg_parallel, "sampler.cache.enabled": args.cache,
        "vae.checkpoint": args.vae,
        "save_latents": args.save_latents})
    summary = run_generate(cfg, args.checkpoint, args.prompts, args.output, args.address)
    rate = summary["videos_per_minute"]
    print(f"{summary['generated']} videos generated ({summary['already_done']} already done)"
          f" in {summary['wall_seconds']}s{f' ({rate} videos/min)' if rate else ''}; "
          f"gallery {summary['gallery']}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def add_eval(sub: Sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="colour flicker, shape morphing, object vanishing, smoothness, prompt adherence",
        description="Measure the main object of each video (pixel maths, no network): colour "
        "flicker, shape morphing, vanishing, motion smoothness, and for synthetic-domain "
        "prompts the detected colour, shape and direction against the prompt. Per video and "
        "per set in DIR/eval.json, DIR/eval.md (printed) and DIR/eval.png.",
    )
    p.add_argument("--videos", required=True,
                   help="a `tubelet generate` output folder, or videos as `preprocess` reads "
                   "them (captions.jsonl beside them gives the prompts)")
    p.add_argument("--reference", default=None,
                   help="real clips (e.g. the training videos) measured the same way")
    p.add_argument("--prompts", default=None,
                   help="a .jsonl/.csv/.parquet manifest with 'path' and 'prompt' (or "
                   "'caption'): the prompts of --videos")
    p.add_argument("--output", default=None, help="report folder")
    add_address(p)
    return p


def run_eval(args: argparse.Namespace) -> int:
    from pipeline.eval import EvalConfig, report_table, run_eval

    cfg = config(EvalConfig, args)
    report = run_eval(cfg, args.videos, args.reference, args.prompts, args.output,
                      args.address)
    print(report_table(report))
    where = f"; {args.output}/eval.json" if args.output else ""
    n = report["aggregate"]["generated"]["videos"]
    print(f"{n} videos measured, {len(report['errors'])} errors; "
          f"{report['wall_seconds']}s{where}")
    return 0 if n else 1


# ---------------------------------------------------------------------------------------------
# The table, the parser, main

COMMANDS: dict[str, tuple[Callable[[Sub], argparse.ArgumentParser],
                          Callable[[argparse.Namespace], int]]] = {
    "synth": (add_synth, run_synth),
    "preprocess": (add_preprocess, run_preprocess),
    "train-vae": (add_train_vae, run_train_vae),
    "eval-vae": (add_eval_vae, run_eval_vae),
    "train": (add_train, run_train),
    "generate": (add_generate, run_generate),
    "eval": (add_eval, run_eval),
}


def config_classes() -> dict[str, type]:
    """Config dataclass of each `configs/<folder>/` (a command, or a shared table); the tests
    load every shipped file with it."""
    from actors.common.buckets import BucketConfig
    from pipeline.eval import EvalConfig
    from pipeline.eval_vae import EvalVAEConfig
    from pipeline.generate import GenerateConfig
    from pipeline.streams import PreprocessConfig
    from pipeline.synth import SynthConfig
    from pipeline.train import TrainConfig
    from pipeline.train_vae import TrainVAEConfig

    return {"synth": SynthConfig, "preprocess": PreprocessConfig, "train": TrainConfig,
            "train-vae": TrainVAEConfig, "eval-vae": EvalVAEConfig, "generate": GenerateConfig,
            "eval": EvalConfig, "buckets": BucketConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tubelet",
        description="Ray-based pipelined dataflow for video diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, run in COMMANDS.values():
        p = add(sub)
        p.add_argument("--config", type=Path, metavar="FILE",
                       help="YAML config file (default: configs/<command>/default.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one config key, e.g. --set seed=3 (repeatable)")
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:  # bad input: one line, exit 2
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"tubelet {args.command}: {kind}{e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipeline.ray_train import TrainFailed  # loaded already by whatever raised it

        if isinstance(e, TrainFailed):
            print(f"tubelet {args.command}: {e}", file=sys.stderr)
            return 1
        full = unwritable(e)  # the disk filled up or the output went read-only mid-job
        if full is None:
            raise
        print(f"tubelet {args.command}: stopped, its output cannot be written ({full}); what "
              "is finished is kept (files are written whole), free space or fix the output, "
              "then rerun the same command to resume", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
