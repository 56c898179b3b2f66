"""One process, no Ray: the training loops of `tubelet train` and `tubelet train-vae` on one
device of this machine.

    python -m pipeline.local train --data RUN_PRE/latents --output RUN [--config C] [--set k=v]
    python -m pipeline.local train-vae --input VIDEOS --output RUN [--val VIDEOS] [--config C]

Ray Train workers run `actors/workers/train_dit.py:train_loop` and
`actors/workers/train_vae.py:train_vae_loop` with a `RayBackend`; here the same functions run in
this process with a `LocalBackend` (checkpoints straight to RUN/checkpoints/step_N), on
`--device` (default: the GPU when there is one). For a single-GPU box, a debugger, or a machine
without Ray installed (nothing here imports Ray). The configs, the run folder (config.yaml,
run.json, metrics.jsonl, loss.png, export/) and `--resume` are those of the Ray jobs:

- `train` reads the latent dataset's plan in this process (what `data.loader: worker` does in a
  Train worker; one worker, so `num_workers` and the Ray sections are not used);
- `train-vae` decodes its videos here with the preprocess stages (`decoded`: probe, assign,
  decode; the Ray job streams the same stages through actor pools), holds out `data.val_videos`
  as the Ray job does and ends with the same held-out PSNR / SSIM (`finish`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, UsageError, resolve_config, to_dict, write_run_record


def pick_device(name: str) -> str:
    """--device -> the device string the loops take ("cuda" -> "cuda:0": DDP and NCCL want
    the index); a CUDA device where there is none is a UsageError."""
    import torch

    from models.device import pick_device as torch_device

    device = torch_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
    return "cuda:0" if str(device) == "cuda" else str(device)


def train_local(cfg: Any, data: str, output: str, device: str, resume: bool = False
                ) -> dict[str, Any]:
    """`tubelet train --data` in this process (cfg: a pipeline.train.TrainConfig)."""
    from actors.workers.toolkit import LocalBackend
    from actors.workers.train_data import PlanLoader, data_columns
    from actors.workers.train_dit import local_batches, prefetched, train_loop, trainee_of
    from pipeline.ray_train import prepare_run
    from pipeline.report import plot_losses, read_metrics
    from pipeline.train import planned_data

    run = Path(output).resolve()
    prepare_run(run, resume)
    cfg, index, plan = planned_data(cfg, data, 1)
    print(f"[train] {index.num_rows} clips; {plan.steps_per_epoch} steps per epoch, "
          f"{cfg.steps} steps on {device} (one process, no Ray)", flush=True)
    resolved = to_dict(cfg)
    write_run_record(run, "train", cfg, data=str(data), resume=resume, device=device,
                     runner="pipeline.local", clips=index.num_rows)
    start = time.perf_counter()
    trainee = trainee_of(cfg)
    batches = prefetched(local_batches(PlanLoader(index, cfg.data, 1, 0,
                                                  columns=data_columns(cfg)),
                                       trainee.collate()),
                         cfg.data.prefetch_steps, cfg.steps)
    out = train_loop(cfg, LocalBackend(run, device), batches, run, resolved, plan.fingerprint,
                     trainee=trainee)
    rows = read_metrics(run)
    plot_losses(rows, run / "loss.png")
    summary = {"steps": out["step"], "wall_seconds": round(time.perf_counter() - start, 2),
               "final_loss": rows[-1]["loss"] if rows else None, "export": str(run / "export"),
               "clips": index.num_rows}
    write_run_record(run, "train", cfg, data=str(data), resume=resume, device=device,
                     runner="pipeline.local", **summary)
    return summary


def train_vae_local(cfg: Any, input_src: str, output: str, device: str,
                    val_src: str | None = None, resume: bool = False) -> dict[str, Any]:
    """`tubelet train-vae` in this process (cfg: a pipeline.train_vae.TrainVAEConfig)."""
    from actors.workers.toolkit import LocalBackend
    from actors.workers.train_vae import local_source, train_vae_loop
    from pipeline.ray_train import prepare_run
    from pipeline.train_vae import decoded, finish, resolve_init, sources_and_held_out

    cfg = resolve_init(cfg)
    run = Path(output).resolve()
    prepare_run(run, resume)
    start = time.perf_counter()
    train_src, _, val_rows, val_clips, val = sources_and_held_out(cfg, input_src, val_src, run)
    clips = decoded(cfg.preprocess, train_src, run / "errors")
    print(f"[train-vae] {train_src.num_rows} training videos -> {clips.num_rows} clips "
          f"(decoded in {time.perf_counter() - start:.0f} s), {len(val_clips)} held-out clips; "
          f"{cfg.steps} steps on {device} (one process, no Ray)", flush=True)
    resolved = to_dict(cfg)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     device=device, runner="pipeline.local", train_videos=train_src.num_rows)
    train_vae_loop(cfg, LocalBackend(run, device), local_source([clips]), run, resolved, val)
    summary = finish(cfg, run, val_rows, val_clips)
    summary.update(wall_seconds=round(time.perf_counter() - start, 2),
                   train_videos=train_src.num_rows)
    write_run_record(run, "train-vae", cfg, input=input_src, val=val_src, resume=resume,
                     device=device, runner="pipeline.local", **summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.local", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("train", "a DiT on a latent dataset"), ("train-vae", "a video VAE")):
        s = sub.add_parser(name, help=what)
        if name == "train":
            s.add_argument("--data", required=True, help="a latent dataset (preprocess output)")
        else:
            s.add_argument("--input", required=True, help="training videos (folder / manifest)")
            s.add_argument("--val", help="held-out videos (default: data.val_videos of --input)")
        s.add_argument("--output", required=True, help="the run folder")
        s.add_argument("--config", help=f"YAML (default configs/{name}/default.yaml)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
        s.add_argument("--resume", action="store_true", help="continue RUN's last checkpoint")
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        if args.command == "train":
            from pipeline.train import TrainConfig

            cfg = resolve_config(TrainConfig, "train", args.config, args.set)
            summary = train_local(cfg, args.data, args.output, device, args.resume)
        else:
            from pipeline.train_vae import TrainVAEConfig

            cfg = resolve_config(TrainVAEConfig, "train-vae", args.config, args.set)
            summary = train_vae_local(cfg, args.input, args.output, device, args.val,
                                      args.resume)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "held_out_clips"}, indent=2,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
