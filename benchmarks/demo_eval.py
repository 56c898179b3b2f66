"""What a DiT export draws: `tubelet generate` on the demo's 32 prompts (colour x shape x
direction, none a training caption; 16:9, 9:16, 1:1; 9 and 17 frames) for each seed, then
`tubelet eval` against reference videos; one table per seed and the mean ± std over seeds.

    python benchmarks/demo_eval.py --checkpoint weights/dit-demo [--reference demo/videos]
        [--vae VAE] [--seeds 0 1] [--steps 30] [--out runs/demo-eval]

The issue's targets for the demo model: colour >= 90%, shape >= 60%, direction >= 70%,
vanish <= 5%, colour flicker and morphing <= 3x the reference videos'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attention_ablation import ROOT, spread, tubelet

METRICS = ("color_adherence", "shape_adherence", "direction_adherence", "vanish")
RATIOS = ("color_flicker", "morph")
TARGETS = {"color_adherence": (">=", 0.9), "shape_adherence": (">=", 0.6),
           "direction_adherence": (">=", 0.7), "vanish": ("<=", 0.05),
           "color_flicker_x": ("<=", 3.0), "morph_x": ("<=", 3.0)}


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    out = args.out / f"seed{seed}"
    gen_s = tubelet("generate", "--checkpoint", str(args.checkpoint), "--prompts",
                    str(args.prompts), "--output", str(out / "gen"), "--steps", str(args.steps),
                    "--seed", str(seed), *(["--vae", str(args.vae)] if args.vae else []))
    tubelet("eval", "--videos", str(out / "gen"), "--reference", str(args.reference),
            "--output", str(out / "eval"))
    report = json.loads((out / "eval" / "eval.json").read_text())
    agg = report["aggregate"]["generated"]
    return {"seed": seed, "generate_s": gen_s, **{k: agg[k] for k in METRICS},
            **{f"{k}_x": report["ratios"][k] for k in RATIOS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "weights/dit-demo")
    p.add_argument("--prompts", type=Path, default=ROOT / "configs/prompts/demo.jsonl")
    p.add_argument("--reference", type=Path, default=ROOT / "demo/videos",
                   help="training-domain videos (make demo's: tubelet synth --seed 0)")
    p.add_argument("--vae", default=None, help="the VAE to decode with (default: the one the "
                   "export records, else the shipped one)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "runs/demo-eval")
    args = p.parse_args()
    rows = [one_seed(args, s) for s in args.seeds]
    cols = [*METRICS, *(f"{k}_x" for k in RATIOS)]
    lines = ["| seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['seed']} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |" for r in rows]
    lines.append("| mean ± std | " + " | ".join(spread([r[c] for r in rows]) for c in cols)
                 + " |")
    met = {c: (sum(r[c] for r in rows) / len(rows) >= v if op == ">=" else
               sum(r[c] for r in rows) / len(rows) <= v) for c, (op, v) in TARGETS.items()}
    md = (f"{args.checkpoint}: {len(rows)} seeds x the prompts of {args.prompts.name}, "
          f"{args.steps} steps; reference {args.reference}\n\n" + "\n".join(lines)
          + "\n\ntargets met (mean over seeds): "
          + ", ".join(f"{c} {'yes' if ok else 'no'}" for c, ok in met.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_eval.json").write_text(json.dumps(rows, indent=2))
    (args.out / "demo_eval.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
