"""Videos per hour at a quality the user accepts: `tubelet generate` on the demo model and the
demo's 32 prompts of mixed sizes, against a plain loop over the same prompts, and each speed
switch (step caching, packed batches, torch.compile) with what it costs in quality.

    python benchmarks/generate_speed.py [--checkpoint weights/dit-demo]
        [--prompts configs/prompts/demo.jsonl] [--steps 30] [--thresholds 0.05 0.1 0.2]
        [--skip-compile] [--skip-eval] [--out runs/generate-speed]

Same run, same machine, same models, same prompts and settings:
- plain loop: one process calls the generation stages' own models one prompt after another
  (text encode -> sample -> VAE decode -> mp4), the way a diffusers user writes a loop; its
  models load inside the timed span, as the job's do;
- `run_generate` (what `tubelet generate` runs) with the shipped defaults ("exact"), then with
  one switch at a time, each on a fresh local Ray that it starts itself (counted);
- "before": the defaults this issue started from (four pools, one sampler actor of 0.6 CPU,
  two decoders; the sample pool took 4 prompts per call, so the first video waited for four);
- "exact": today's pools (`share_processes`: text encode inside the sampler actors, mp4
  encode inside the VAE decoders; two sampler actors) with one video per forward: the
  reference every PSNR is measured against;
- "default": configs/generate/default.yaml as shipped (packed batches);
- "cache T": the default with `--cache` at threshold T; "compile": with `sampler.compile`;
- "default, Ray up": the default on a Ray that is already running (as under
  `ray job submit`), its start timed apart.
Printed per run: wall seconds, videos/min, ratio to the plain loop, time to the first video,
steps skipped (caching), and quality against the exact run: PSNR of every decoded mp4 frame
(mean over videos, worst video), and with --skip-eval unset `tubelet eval`'s colour / shape /
direction adherence and colour flicker against reference videos (the demo's 24 synthetic
training-domain videos, made here). Not a test; a shared 2-core box is noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere

from actors.common.tensors import unpack  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.generate import GenerateConfig, generate_stages, inspect_model  # noqa: E402
from pipeline.prompts import read_prompts  # noqa: E402

try:  # the same `run_generate` timing as benchmarks/generate.py
    from benchmarks.generate import pipelined
except ImportError:
    from generate import pipelined


def plain_loop(cfg: GenerateConfig, checkpoint: Path, prompts: Path, out: Path) -> dict:
    """The four stages' models, one prompt after another, in this process."""
    t0 = time.perf_counter()
    model = inspect_model(checkpoint, cfg.vae)
    cfg = replace(cfg, vae=replace(cfg.vae, checkpoint=model.vae))  # `auto` resolved
    rows = read_prompts(prompts, cfg.defaults, model.grid)
    stages = [spec.build() for spec in generate_stages(cfg, model, out, gpus=False)]
    torch.set_num_threads(os.cpu_count() or 1)  # a plain script's torch uses every core
    first = None
    for row in rows:
        table = pa.Table.from_pylist([row])
        for stage in stages:
            table = stage(table)
        first = first or time.perf_counter() - t0
    wall = time.perf_counter() - t0
    return {"wall": wall, "first": first, "videos": len(rows)}


def tubelet_run(cfg: GenerateConfig, checkpoint: Path, prompts: Path, out: Path) -> dict:
    run = pipelined(cfg, checkpoint, prompts, out)
    return {"wall": run["wall"], "first": run["summary"]["first_video_seconds"],
            "videos": run["summary"]["generated"]}


def psnr(out: Path, exact: Path, decoder) -> tuple[float, float]:
    """(mean, worst) PSNR in dB of each video of `out` against the exact run's, both decoded
    here by one VAE from the latents each run saved (`save_latents`): the sampler's
    difference alone (the mp4s of two identical runs can differ by a rounding flip where
    decode actors ran with other thread counts). A video equal to its exact one counts as
    99 dB in the mean; the worst is inf when all are equal."""
    values = []
    for z in sorted((exact / "latents").glob("*.npy")):
        a = decoder.decode(np.load(z)).astype(np.float64)
        b = decoder.decode(np.load(out / "latents" / z.name))
        mse = float(np.mean((a - b) ** 2))
        values.append(math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    return float(np.mean([min(v, 99.0) for v in values])), min(values)


def evaluate(out: Path, reference: Path) -> dict:
    """`tubelet eval` of a run's videos: adherence and colour flicker."""
    res = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--videos", str(out),
                          "--reference", str(reference), "--output", str(out / "eval")],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"tubelet eval failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "eval" / "eval.json").read_text())
    agg = report["aggregate"]["generated"]
    return {"color": agg["color_adherence"], "shape": agg["shape_adherence"],
            "direction": agg["direction_adherence"],
            "flicker_x": report["ratios"]["color_flicker"]}


def skipped_steps(cfg: GenerateConfig, checkpoint: Path, prompts: Path) -> float:
    """The fraction of steps the cache skips over the prompts (the sample stage's own inputs
    through the sampler's loop, one video at a time, in this process)."""
    from actors.sample import SampleStage
    from actors.text_encode import TextEncodeStage
    from actors.workers.sampler import load_dit, sample_video_latents

    model = inspect_model(checkpoint, cfg.vae)
    rows = read_prompts(prompts, cfg.defaults, model.grid)
    table = TextEncodeStage(str(model.export))(pa.Table.from_pylist(rows))
    stage = SampleStage(str(model.export), {"device": "cpu"}, model.temporal, model.spatial)
    dit = load_dit(str(model.export)).eval()
    text, neg = unpack(table, "text", np.float32), unpack(table, "neg_text", np.float32)
    skipped: list[int] = []
    for i, row in enumerate(table.to_pylist()):
        sample_video_latents(dit, **stage.inputs([row], [text[i]], [neg[i]]),
                             cache=cfg.sampler.cache, skipped=skipped)
    return sum(skipped) / sum(r["steps"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "weights/dit-demo")
    p.add_argument("--prompts", type=Path, default=ROOT / "configs/prompts/demo.jsonl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "runs/generate-speed")
    args = p.parse_args()
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    base = load_config(GenerateConfig, ROOT / "configs/generate/default.yaml",
                       [f"defaults.steps={args.steps}", "save_latents=true"])

    def with_sampler(cfg: GenerateConfig = base, **kw) -> GenerateConfig:
        return replace(cfg, sampler=replace(cfg.sampler, **kw))

    def resources(cfg: GenerateConfig, **pools: tuple[float, int | str, int]) -> GenerateConfig:
        return replace(cfg, **{k: replace(getattr(cfg, k), num_cpus=c, max_actors=m,
                                          batch_size=b) for k, (c, m, b) in pools.items()})

    # "before": the defaults this issue started from; "exact": today's pools, one video per
    # forward (the reference of every PSNR); "default": what configs/generate/default.yaml ships
    before = resources(with_sampler(batch_invariant=True), text=(0.1, "auto", 8),
                       sample=(0.6, "auto", 4), decode=(0.45, "auto", 1),
                       encode=(0.1, "auto", 1))
    variants: dict[str, GenerateConfig] = {
        "before": replace(before, share_processes=False),
        "exact": with_sampler(batch_invariant=True),
        "default": base,
    }
    cache = replace(base.sampler.cache, enabled=True)
    for thr in args.thresholds:
        variants[f"cache {thr:g}"] = with_sampler(cache=replace(cache, threshold=thr))
    if not args.skip_compile:
        variants["compile"] = with_sampler(compile=True)

    results = {"plain loop": plain_loop(variants["exact"], args.checkpoint, args.prompts,
                                        args.out / "plain")}
    for name, cfg in variants.items():
        results[name] = tubelet_run(cfg, args.checkpoint, args.prompts,
                                    args.out / name.replace(" ", "-"))
        print(f"  {name}: {results[name]['wall']:.1f} s", flush=True)
    # the same defaults on a Ray that is already up (as under `ray job submit`): its start
    # timed apart
    from pipeline.runtime import ray_session

    t0 = time.perf_counter()
    with ray_session(None, base.ray):
        ray_start = time.perf_counter() - t0
        results["default, Ray up"] = tubelet_run(base, args.checkpoint, args.prompts,
                                                 args.out / "default-ray-up")
    exact = args.out / "exact"
    plain = results["plain loop"]
    from actors.vae_decode import VAEDecodeStage

    vae = inspect_model(args.checkpoint, base.vae).vae
    decoder = VAEDecodeStage(replace(base.vae, checkpoint=vae), num_cpus=1)
    print(f"\n{plain['videos']} prompts of {args.prompts.name}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; starting a local Ray: "
          f"{ray_start:.1f} s (counted in every run but 'default, Ray up')")
    print("| run | wall s | videos/min | x plain loop | first video s | skipped | "
          "PSNR dB mean / worst |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rate = 60 * r["videos"] / r["wall"]
        quality, skip = "", ""
        if name.startswith("cache "):  # one video per forward: the per-video decisions
            cfg = with_sampler(cache=replace(cache, threshold=float(name.split()[1])))
            skip = f"{skipped_steps(cfg, args.checkpoint, args.prompts):.0%}"
        if name not in ("plain loop", "exact", "default, Ray up"):
            mean, worst = psnr(args.out / name.replace(" ", "-"), exact, decoder)
            quality = "identical" if math.isinf(worst) else f"{mean:.1f} / {worst:.1f}"
        print(f"| {name} | {r['wall']:.1f} | {rate:.2f} | {plain['wall'] / r['wall']:.2f} | "
              f"{r['first']:.1f} | {skip} | {quality} |")
    if args.skip_eval:
        return
    from pipeline.synth import SynthConfig, synthesize

    reference = args.out / "reference"
    synthesize(SynthConfig(num_videos=24, seed=0, workers=1), reference)  # make demo's videos
    print("\n| run | colour | shape | direction | colour flicker x |")
    print("|---|---|---|---|---|")
    for name in ("exact", "default", *(n for n in results if n.startswith("cache"))):
        e = evaluate(args.out / name.replace(" ", "-"), reference)
        print(f"| {name} | {e['color']:.1%} | {e['shape']:.1%} | {e['direction']:.1%} | "
              f"{e['flicker_x']:.2f} |")


if __name__ == "__main__":
    main()
