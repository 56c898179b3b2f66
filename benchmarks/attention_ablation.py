"""Attention-layout study: the same data and the same number of steps for each
layout, over several seeds; final loss, training time, sampling time per video and the
`tubelet eval` metrics of generated videos, as a table with the spread over seeds.

    python benchmarks/attention_ablation.py --data data/dit-pre/latents \
        [--steps 300] [--seeds 0 1] [--layouts spatial temporal factorized interleaved full3d] \
        [--config configs/train/demo.yaml] [--prompts configs/prompts/demo.jsonl] [--out DIR]

Budget: same steps (and batch) for every layout, so training time is a result, not a control.
Each run is the real CLI (`tubelet train`, `tubelet generate`, `tubelet eval`), one after the
other (on 2 cores, CPU-heavy runs go one at a time). Writes DIR/ablation.json and
DIR/ablation.md; prints the table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("spatial", "temporal", "factorized", "interleaved", "full3d")
METRICS = ("vanish", "color_flicker", "morph", "jerk", "color_adherence", "shape_adherence",
           "direction_adherence")


def tubelet(*args: str) -> float:
    """Run one CLI command to completion; its wall seconds (raises on failure)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"tubelet {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def one_run(args: argparse.Namespace, layout: str, seed: int) -> dict:
    run = args.out / f"{layout}-seed{seed}"
    train_s = tubelet("train", "--data", str(args.data), "--output", str(run / "train"),
                      "--config", str(args.config), "--set", f"model.layout={layout}",
                      "--set", f"seed={seed}", "--set", f"steps={args.steps}",
                      "--set", f"checkpoint_every={args.steps}",
                      # a short run: an EMA that forgets its (zero-output) init in time, and a
                      # warmup that fits in the run
                      "--set", f"optim.ema_decay={args.ema_decay}",
                      "--set", f"optim.warmup_steps={max(1, args.steps // 10)}")
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    tail = metrics[-max(1, len(metrics) // 10):]  # the last tenth: less noisy than one step
    tubelet("generate", "--checkpoint", str(run / "train"), "--prompts", str(args.prompts),
            "--output", str(run / "gen"), "--steps", str(args.sample_steps),
            "--seed", str(seed))
    gen = json.loads((run / "gen" / "summary.json").read_text())
    tubelet("eval", "--videos", str(run / "gen"), "--output", str(run / "eval"))
    agg = json.loads((run / "eval" / "eval.json").read_text())["aggregate"]["generated"]
    return {"layout": layout, "seed": seed, "train_s": train_s,
            "final_loss": statistics.fmean(m["loss"] for m in tail),
            "step_s": statistics.median(m["step_s"] for m in metrics[len(metrics) // 5:]),
            "sample_s_per_video": gen["stage_busy_seconds"]["sample_seconds"] / gen["videos"],
            **{k: agg[k] for k in METRICS}}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {sd:.2g}"


def table(rows: list[dict], layouts: list[str]) -> str:
    cols = ["final_loss", "step_s", "sample_s_per_video", *METRICS]
    out = ["| layout | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for layout in layouts:
        mine = [r for r in rows if r["layout"] == layout]
        out.append(f"| {layout} | " + " | ".join(spread([r[c] for r in mine]) for c in cols)
                   + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="latent dataset (preprocess)")
    p.add_argument("--config", type=Path, default=ROOT / "configs/train/demo.yaml")
    p.add_argument("--prompts", type=Path, default=ROOT / "configs/prompts/demo.jsonl")
    p.add_argument("--steps", type=int, default=300, help="training steps, every layout")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="EMA of the short runs (the demo recipe's 0.999 needs thousands of steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--out", type=Path, default=ROOT / "runs/attention-ablation")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for layout in args.layouts:
            rows.append(one_run(args, layout, seed))
            r = rows[-1]
            print(f"[ablation] {layout} seed {seed}: loss {r['final_loss']:.4f}, "
                  f"{r['train_s']:.0f} s train, {r['sample_s_per_video']:.2f} s/video sampling",
                  flush=True)
    md = (f"Same data ({args.data}), same steps ({args.steps}, config {args.config.name}), "
          f"seeds {args.seeds}; mean ± std over seeds.\n\n" + table(rows, args.layouts))
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=2))
    (args.out / "ablation.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
