"""Generation throughput: the Ray Data pipeline against the same stages one after another, the
sampler per attention layout, and sequence parallelism K = 2 against K = 1.

    python benchmarks/generate.py [--videos 8] [--size 128] [--frames 9] [--steps 10]
                                  [--skip-pipeline] [--skip-layouts] [--skip-sp]

1. End to end, same run, same prompts, same stage code: `run_generate` (four actor pools,
   streaming, on a local Ray of this machine's CPUs) vs one process that calls the four stages
   in order on the whole table (each with the same torch thread count as its pool actor).
   Printed: videos/min of both and the ratio pipelined / sequential (target >= 1.3). The
   local Ray is started first and timed apart (a job runs on a running cluster); the actor
   pools' start-up and model loading count, as the sequential run's model loading does. Also
   printed: the ratio with Ray's start counted, and the pipeline's rate from its first video
   to its last (steady state).
2. Sampler seconds per step and per video for each attention layout (debug-width DiT, same
   size, CFG on: two forwards per step), in this process.
3. K = 2 sequence parallel (two ranks, gloo, one Ray actor as the second rank) vs K = 1,
   per video, for full3d (Ulysses) and factorized (DSP). On 2 cores the two ranks share the
   machine the single rank had alone: expect no speed-up here; the figure is the overhead.

Models: the shipped VAE (weights/vae-dc.safetensors, 16 channels) and a debug DiT with
random (non-zero) weights, exported by the real export code (tests/exports.py). Not a test;
a shared 2-core box is noisy (run twice).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from actors.common.stage import run_here  # noqa: E402
from actors.sample import row_noise  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.generate import (  # noqa: E402
    GenerateConfig,
    generate_stages,
    inspect_model,
    run_generate,
)
from pipeline.prompts import read_prompts  # noqa: E402
from tests.exports import write_export  # noqa: E402

VAE = str(ROOT / "weights" / "vae-dc.safetensors")
COLORS = ("red", "green", "blue", "yellow")
MOTIONS = ("moving right", "moving left", "moving up", "moving down")


def prompt_file(path: Path, n: int) -> Path:
    lines = [f"a {COLORS[i % 4]} circle {MOTIONS[(i // 4) % 4]}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def sequential(cfg: GenerateConfig, export: Path, prompts: Path, out: Path) -> float:
    """The four stages, one after another, in this process, on the whole table."""
    model = inspect_model(export, cfg.vae)
    rows = read_prompts(prompts, cfg.defaults, model.grid)
    t0 = time.perf_counter()
    run_here(pa.Table.from_pylist(rows), generate_stages(cfg, model, out, gpus=False))
    return time.perf_counter() - t0


def pipelined(cfg: GenerateConfig, export: Path, prompts: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    summary = run_generate(cfg, export, prompts, out, progress=False)
    return {"wall": time.perf_counter() - t0, "summary": summary}


def bench_pipeline(args, root: Path) -> None:
    export = write_export(root / "export", in_channels=16)
    prompts = prompt_file(root / "prompts.txt", args.videos)
    cfg = load_config(GenerateConfig, ROOT / "configs/generate/default.yaml",
                      [f"defaults.height={args.size}", f"defaults.width={args.size}",
                       f"defaults.frames={args.frames}", f"defaults.steps={args.steps}"],
                      {"vae.checkpoint": VAE})
    seq = sequential(cfg, export, prompts, root / "seq")

    from pipeline.runtime import ray_session

    t0 = time.perf_counter()
    # a running cluster, as under `ray job submit`; its start is timed apart
    with ray_session(None, cfg.ray):
        ray_start = time.perf_counter() - t0
        pipe = pipelined(cfg, export, prompts, root / "pipe")
    n = args.videos
    print(f"end to end, {n} videos of {args.size}x{args.size}x{args.frames}, {args.steps} "
          f"steps, CFG {cfg.defaults.cfg}:")
    print(f"  sequential (one process)  {seq:7.1f} s  {60 * n / seq:6.2f} videos/min")
    print(f"  pipelined (Ray Data)      {pipe['wall']:7.1f} s  {60 * n / pipe['wall']:6.2f} "
          f"videos/min  (actor pools start and load their models inside this time; starting "
          f"the local Ray itself took {ray_start:.1f} s before it)")
    print(f"  ratio pipelined / sequential: {seq / pipe['wall']:.2f}x (target >= 1.3); with "
          f"Ray's start counted: {seq / (pipe['wall'] + ray_start):.2f}x")
    first, last = pipe["summary"]["first_video_seconds"], pipe["summary"]["last_video_seconds"]
    if n > 1 and last > first:
        steady = (n - 1) / (last - first)
        print(f"  steady state (first to last video): {60 * steady:6.2f} videos/min, ratio "
              f"{steady * seq / n:.2f}x; the first video after {first:.1f} s (Ray start-up, "
              "actor pools loading their models)")
    busy = pipe["summary"]["stage_busy_seconds"]
    print(f"  pipeline stage busy seconds: {json.dumps(busy)}")


def bench_layouts(args, root: Path) -> None:
    from actors.workers.sampler import SamplerConfig, SamplerGroup

    torch.set_num_threads(1)
    latent = (16, 1 + (args.frames - 1) // 4, args.size // 8, args.size // 8)
    print(f"sampler per layout, one video, latent {latent}, {args.steps} steps, CFG on:")
    per_layout = {}
    for layout in ("spatial", "temporal", "full3d", "factorized", "interleaved"):
        export = write_export(root / f"layout-{layout}", layout=layout, in_channels=16)
        group = SamplerGroup(str(export), SamplerConfig(device="cpu"))
        noise = row_noise(0, latent)[None]
        text, mask = torch.randn(1, 64, 64), torch.ones(1, 64, dtype=torch.bool)  # as Wan's
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            group.sample(noise, text, mask, torch.tensor([8.0]), steps=args.steps, shift=1.0,
                         guidance=4.0)
            times.append(time.perf_counter() - t0)
        group.close()
        t = statistics.median(times)
        per_layout[layout] = t
        print(f"  {layout:12s} {t / args.steps * 1000:7.1f} ms/step  {t:6.2f} s/video")
    try:
        from benchmarks.wan_loop import wan_loop_seconds
    except ImportError:
        from wan_loop import wan_loop_seconds
    try:
        wan = wan_loop_seconds(hidden=64, depth=2, heads=4, latent=latent, patch=(1, 2, 2),
                               text_len=64, text_dim=64, steps=args.steps, guidance=4.0)
    except ImportError as e:
        print(f"  diffusers loop: skipped ({e})")
        return
    t = wan["seconds_per_video"]
    print(f"  diffusers {wan['diffusers']} WanTransformer3DModel + FlowMatchEulerDiscreteScheduler "
          f"loop: {t / args.steps * 1000:7.1f} ms/step  {t:6.2f} s/video; full3d ours / theirs "
          f"time = {per_layout['full3d'] / t:.2f}")


def bench_sp(args, root: Path) -> None:
    import ray

    from actors.workers.sampler import SamplerConfig, SamplerGroup

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             log_to_driver=False)
    latent = (16, 1 + (args.frames - 1) // 4, args.size // 8, args.size // 8)
    print(f"sequence parallel, one video, latent {latent}, {args.steps} steps, CFG on:")
    try:
        for layout in ("full3d", "factorized"):
            export = write_export(root / f"sp-{layout}", layout=layout, in_channels=16)
            per_k = {}
            for k in (1, 2):
                group = SamplerGroup(str(export), replace(SamplerConfig(device="cpu"),
                                                          sequence_parallel=k))
                noise = row_noise(0, latent)[None]
                text, mask = torch.randn(1, 64, 64), torch.arange(64)[None] < 20
                group.sample(noise, text, mask, torch.tensor([8.0]), steps=1, shift=1.0,
                             guidance=4.0)  # warm-up
                t0 = time.perf_counter()
                group.sample(noise, text, mask, torch.tensor([8.0]), steps=args.steps,
                             shift=1.0, guidance=4.0)
                per_k[k] = time.perf_counter() - t0
                group.close()
            print(f"  {layout:12s} K=1 {per_k[1]:6.2f} s/video  K=2 {per_k[2]:6.2f} s/video  "
                  f"K=1 / K=2 = {per_k[1] / per_k[2]:.2f}x")
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-layouts", action="store_true")
    p.add_argument("--skip-sp", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tubelet-bench-gen-") as tmp:
        root = Path(tmp)
        if not args.skip_pipeline:
            bench_pipeline(args, root)
        if not args.skip_layouts:
            bench_layouts(args, root)
        if not args.skip_sp:
            bench_sp(args, root)


if __name__ == "__main__":
    main()
