"""Where a DiT run's loss lives: mean flow loss per flow-time bin x latent frame, per window
of training steps, from the run's metrics.jsonl (each step row carries rank 0's samples' `t`
and `frame_loss`, the MSE per latent frame). Latent frame 0 is one image (the causal VAE's
first frame); frames 1.. each hold 4 frames of motion.

    python benchmarks/loss_map.py RUN [RUN ...] [--bins 5] [--windows 3] [--json OUT]

A run whose later frames keep a higher loss than frame 0 at the same flow time has not
learned motion; compare runs (recipes) by their last window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_samples(run: Path) -> list[tuple[int, float, list[float]]]:
    """(step, t, per-frame loss) of every logged sample of `run`/metrics.jsonl."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows += [(r["step"], t, f) for t, f in zip(r.get("t", []), r.get("frame_loss", []),
                                                   strict=True)]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl has no per-sample loss (t, frame_loss): a run "
                         "trained before the loss map was logged")
    return rows


def loss_map(samples: list[tuple[int, float, list[float]]], bins: int, windows: int
             ) -> list[dict]:
    """One table per window of steps: {"steps": (a, b), "edges": [...], "mean": [bin][frame]
    (NaN where no sample fell), "count": [bin][frame]}."""
    steps = np.array([s for s, _, _ in samples])
    edges = np.linspace(0.0, 1.0, bins + 1)
    frames = max(len(f) for _, _, f in samples)
    bounds = np.linspace(steps.min(), steps.max() + 1, windows + 1).astype(int)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        total, count = np.zeros((bins, frames)), np.zeros((bins, frames))
        for s, t, f in samples:
            if a <= s < b:
                k = min(int(np.searchsorted(edges, t, side="right")) - 1, bins - 1)
                total[k, :len(f)] += f
                count[k, :len(f)] += 1
        with np.errstate(invalid="ignore"):
            out.append({"steps": (int(a), int(b) - 1), "edges": edges.tolist(),
                        "mean": (total / count).tolist(), "count": count.astype(int).tolist()})
    return out


def table(window: dict) -> str:
    mean = np.asarray(window["mean"])
    head = "| t | " + " | ".join(f"frame {i}" for i in range(mean.shape[1])) + " |"
    lines = [head, "|---" * (mean.shape[1] + 1) + "|"]
    edges = window["edges"]
    for k, row in enumerate(mean):
        cells = " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in row)
        lines.append(f"| {edges[k]:.1f}-{edges[k + 1]:.1f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--bins", type=int, default=5)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = {}
    for run in args.runs:
        maps = loss_map(read_samples(run), args.bins, args.windows)
        result[str(run)] = maps
        for w in maps:
            print(f"\n{run}: steps {w['steps'][0]}-{w['steps'][1]}")
            print(table(w))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
