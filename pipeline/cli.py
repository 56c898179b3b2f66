"""The `tubelet` command line. Each subcommand is a small function registered in COMMANDS.

Every subcommand takes `--config FILE` (a YAML file of its config dataclass; default
`configs/<command>/default.yaml`) and repeated `--set dotted.key=value` overrides; its own
flags (e.g. `--num-videos`) are applied last. A bad key or value exits with status 2 and one
line naming it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config, write_run_record

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def default_config_path(command: str) -> Path | None:
    path = CONFIG_DIR / command / "default.yaml"
    return path if path.is_file() else None


def resolve_config(cls: type, command: str, args: argparse.Namespace, flags: dict[str, Any]):
    """--config (or the command's default file) <- --set overrides <- explicit flags."""
    overrides = list(args.set or [])
    overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    path = args.config if args.config is not None else default_config_path(command)
    return load_config(cls, path, overrides)


# ---------------------------------------------------------------------------------------------
# Subcommands


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the embedded default dataset: captioned synthetic mp4 videos",
        description="Write N real h264 mp4 videos of coloured shapes moving over plain or "
        "textured backgrounds, in several sizes, aspect ratios and frame rates, plus "
        "DIR/captions.jsonl (caption and ground truth per video).",
    )
    p.add_argument("--output", required=True, type=Path, help="directory to write videos to")
    p.add_argument("--num-videos", type=int, help="number of videos (config: num_videos)")
    p.add_argument("--seed", type=int, help="random seed; same seed, same dataset (config: seed)")
    p.set_defaults(run=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import SynthConfig, synthesize

    cfg = resolve_config(SynthConfig, "synth", args,
                         {"num_videos": args.num_videos, "seed": args.seed})
    start = time.perf_counter()
    rows = synthesize(cfg, args.output)
    seconds = time.perf_counter() - start
    write_run_record(args.output, "synth", cfg, videos=len(rows), wall_seconds=round(seconds, 2))
    ratios = sorted({f"{r['width']}x{r['height']}" for r in rows})
    print(f"wrote {len(rows)} videos to {args.output} in {seconds:.1f}s "
          f"({len(rows) / seconds * 60:.0f}/min); sizes: {', '.join(ratios)}")
    return 0


def add_preprocess(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--output", required=True, type=Path, help="output directory")
    p.add_argument("--vae", default=None, help="VAE checkpoint (safetensors from train-vae)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(run=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from pipeline.preprocess import PreprocessConfig, print_summary
    from pipeline.preprocess import run_preprocess as run
    from pipeline.sources import SourceError

    cfg = resolve_config(PreprocessConfig, "preprocess", args, {})
    try:
        summary = run(cfg, args.input, args.output, vae_checkpoint=args.vae or "",
                      address=args.address)
    except SourceError as e:
        print(f"tubelet preprocess: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    from pipeline.train import register  # torch + ray.data: ~3 s, paid by every command

    register(sub)


def add_vae_commands(sub: argparse._SubParsersAction) -> None:
    from pipeline.eval_vae import register_eval_vae
    from pipeline.train_vae import register_train_vae

    register_train_vae(sub)
    register_eval_vae(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_synth, add_preprocess, add_vae_commands, add_train]


def config_classes() -> dict[str, type]:
    """Config dataclass of each `configs/<kind>/` folder (the tests load every shipped file)."""
    from pipeline.preprocess import PreprocessConfig
    from pipeline.synth import SynthConfig
    from pipeline.train import TrainConfig
    from pipeline.train_vae import TrainVAEConfig

    return {"synth": SynthConfig, "preprocess": PreprocessConfig, "train": TrainConfig,
            "vae": TrainVAEConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tubelet",
        description="Ray-based pipelined dataflow for video diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--config", type=Path, metavar="FILE",
                       help="YAML config file (default: configs/<command>/default.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one config key, e.g. --set seed=3 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as e:
        print(f"tubelet {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
