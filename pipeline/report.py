"""What the commands print and draw: metrics rows, loss plots, reconstructions, tables.

Plots use matplotlib's Agg backend, imported when a plot is drawn (not at CLI start-up).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from actors.common.storage import Store, as_store


def read_metrics(run: Path | Store) -> list[dict]:
    """RUN/metrics.jsonl as rows (none before the first step); RUN may be a Store."""
    path = as_store(run).child("metrics.jsonl")
    return ([json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
            if path.is_file() else [])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, png: Path | Store, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `png` (a path or a Store: one whole write)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    as_store(png).write_bytes(buf.getvalue())


def plot_losses(rows: list[dict], png: Path | Store) -> None:
    """Loss per step and a running mean (the raw loss is noisy: t is random per sample)."""
    if not rows:
        return
    png = as_store(png)
    plt = _pyplot()
    steps, loss = [r["step"] for r in rows], np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 20)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title=png.parent.name)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def plot_curves(rows: list[dict], png: Path | Store) -> None:
    """Train loss (and its running mean) with the held-out loss; PSNR of both below."""
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        return
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, axis, label in (("loss", ax, "loss"), ("psnr", bx, "PSNR (dB)")):
        steps, values = [r["step"] for r in train], np.array([r[key] for r in train])
        k = max(1, len(values) // 20)
        axis.plot(steps, values, alpha=0.3, label=f"train {key}")
        axis.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, "valid"),
                  label=f"train, mean of {k}")
        axis.plot([r["step"] for r in val], [r[key] for r in val], "o-", label=f"held-out {key}")
        axis.set(ylabel=label)
        axis.legend()
    ax.set(yscale="log", title=as_store(png).parent.name)
    bx.set(xlabel="step")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def save_side_by_side(originals: list[np.ndarray], recons: list[np.ndarray],
                      png: Path | Store) -> None:
    """Per clip: its first, middle and last frame; original row above reconstruction row."""
    plt = _pyplot()
    tiles = []
    for a, b in zip(originals, recons, strict=True):
        ts = sorted({0, a.shape[0] // 2, a.shape[0] - 1})
        gap = np.full((a.shape[1], 4, 3), 255, np.uint8)
        top = np.concatenate([x for t in ts for x in (a[t], gap)][:-1], axis=1)
        bottom = np.concatenate([x for t in ts for x in (b[t], gap)][:-1], axis=1)
        tiles.append(np.concatenate([top, np.full((2, top.shape[1], 3), 255, np.uint8),
                                     bottom], axis=0))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 8), (0, width - t.shape[1]), (0, 0)), constant_values=255)
             for t in tiles]
    buf = io.BytesIO()
    plt.imsave(buf, np.concatenate(tiles, axis=0), format="png")
    as_store(png).write_bytes(buf.getvalue())


def eval_table(report: dict[str, Any]) -> str:
    """eval-vae's Markdown table: one line per video, then the overall line."""
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


def print_preprocess_summary(summary: dict[str, Any]) -> None:
    """Clips per bucket, errors and skips by reason, throughput (preprocess's summary.json)."""
    print(f"\n{'bucket':<28}{'clips':>8}")
    for bucket, n in summary["per_bucket"].items():
        print(f"{bucket:<28}{n:>8}")
    print(f"{'total written':<28}{summary['clips_written']:>8}")
    print(f"{'already done (resumed)':<28}{summary['clips_already_done']:>8}")
    for reason, n in summary["by_reason"].items():
        print(f"  {reason:<50}{n:>6}")
    print(f"{summary['inputs']} inputs, {summary['errors']} errors, {summary['skipped']} skipped; "
          f"{summary['wall_seconds']}s wall, {summary['clips_per_second']} clips/s, "
          f"{summary['frames_per_second']} frames/s")
