"""`tubelet eval`: temporal consistency and prompt adherence of (generated) videos.

    tubelet eval --videos DIR [--reference DIR] [--prompts MANIFEST] [--output DIR]

The three temporal failures the Sora-style DiT literature names (colour flicker, shape
morphing, object vanishing), motion smoothness, and prompt adherence (colour, shape and
direction of the prompted object) for synthetic-domain prompts ("a red circle moving left on
a dark background"), by pixel maths on the main object's mask and track: no pretrained network
(models/video_metrics.py has the definitions, actors/video_eval.py the stage).

Videos: a `tubelet generate` output folder (its manifest gives each video's prompt), a folder
of videos with `captions.jsonl` (a `tubelet synth` dataset), or any folder, glob or manifest
`preprocess` reads. `--prompts` gives the prompts instead: a .jsonl / .csv / .parquet manifest
with `path` and `prompt` (or `caption`) columns. `--reference` runs the same on real clips (the
training videos) so that generated numbers read against what real data scores; the report
gives generated / reference ratios of the flicker and morph numbers.

A Ray Data graph: the rows, then a `VideoEvalStage` actor pool (decode + measure); a file that
cannot be decoded is a row of DIR/errors. Output in DIR: eval.json (per video, aggregate per
set, ratios, config), eval.md (the table printed on stdout), eval.png (a chart of the
aggregates). Without --output only the table is printed.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pds

from actors.common.stage import StageResources, StageSpec, apply_all
from actors.common.storage import (
    StorageConfig,
    StorageError,
    Store,
    as_store,
    filesystem_of,
    locate,
    redact,
    storage_reason,
)
from actors.video_eval import CHECKS, METRICS, VideoEvalStage
from actors.write import parquet_files
from models.video_metrics import region_features
from pipeline.config import UsageError, output_store, write_run_record
from pipeline.pools import sized
from pipeline.report import save_figure
from pipeline.runtime import RayConfig, ray_session
from pipeline.sources import SourceError, list_sources
from pipeline.synth import COLORS, DIRECTIONS, SHAPES, shape_mask

# Flicker and morph: lower is steadier; these are the ones read against the reference.
RATIO_METRICS = ("color_flicker", "hist_flicker", "area_cv", "morph", "jerk")


@dataclass
class EvalConfig:
    """configs/eval/*.yaml."""

    stage: StageResources = field(default_factory=lambda: StageResources(0.5, batch_size=2))
    tol: float = 80.0  # RGB distance within which a pixel takes a palette colour
    direction_frames: int = 4  # steps of the track the initial direction is read over
    max_frames: int = 17  # per video (after `fps`); 0 = all
    # Frames per second every video is measured at (0 = its own rate): the training clips'
    # rate (the bucket table's target_fps), so per-frame numbers of real and generated
    # videos compare step for step.
    fps: float = 8.0
    ray: RayConfig = field(default_factory=RayConfig)
    # object-store access for s3:// paths (--videos, --reference, --output):
    # actors/common/storage.py
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if self.tol <= 0 or self.direction_frames < 1 or self.max_frames < 0 or self.fps < 0:
            raise ValueError("tol: must be > 0; direction_frames: >= 1; max_frames, fps: >= 0")


def eval_stages(cfg: EvalConfig, out: Path | Store, fs: Any = None) -> list[StageSpec]:
    """The eval graph: one stage that decodes each video and measures it against the synth
    palette, shapes and directions its prompt names (`fs`: object-store videos' filesystem)."""
    return [VideoEvalStage.spec(cfg, as_store(out).child("errors"), COLORS, shape_references(),
                                DIRECTIONS, fs)]


class EvalInputError(UsageError):
    """Videos or prompts `eval` cannot read; one line for the user."""


def parse_prompt(text: str) -> dict[str, str | None]:
    """The colour, shape and direction a synthetic-domain prompt asks for (None if absent)."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)?", (text or "").lower())
    direction = None
    for i, w in enumerate(words[:-1]):
        if w == "moving" and words[i + 1] in DIRECTIONS:
            direction = words[i + 1]
    return {"color": next((w for w in words if w in COLORS), None),
            "shape": next((w for w in words if w in SHAPES), None), "direction": direction}


def shape_references(size: int = 48) -> dict[str, tuple[float, float, float]]:
    """(extent, solidity, offset) of each synthetic shape, measured like a tracked object."""
    return {s: region_features(shape_mask(s, size)) for s in SHAPES}


def video_rows(videos: str, prompts: str | None, storage: StorageConfig | None = None
               ) -> list[dict[str, Any]]:
    """(path, prompt) of every video: a generate folder's manifest, captions, or --prompts.
    `videos` may be an object-store URI; its rows are then URIs."""
    try:
        folder = locate(videos, "--videos", storage, must_exist=True)
        manifest = folder.child("manifest").is_dir()
    except StorageError as e:
        raise EvalInputError(str(e)) from None
    except OSError as e:
        raise EvalInputError(f"--videos {videos}: {storage_reason(e)}") from None
    if manifest:
        parts = parquet_files(folder.child("manifest"))
        table = (pds.dataset([p.path for p in parts], filesystem=parts[0].fs)
                 .to_table(columns=["file", "prompt"]) if parts else None)
        rows = [{"path": folder.child(*Path(f).parts).uri, "prompt": p}
                for f, p in zip(table.column("file").to_pylist(),
                                table.column("prompt").to_pylist(), strict=True)
                ] if table is not None else []
        if not rows:
            raise EvalInputError(f"{folder}/manifest holds no videos; run `tubelet generate` "
                                 "into it first")
    else:
        try:
            sources = list_sources(videos, storage=storage)
        except SourceError as e:
            raise EvalInputError(str(e)) from None
        rows = [{"path": p, "prompt": c} for p, c in zip(
            sources.column("path").to_pylist(), sources.column("caption").to_pylist(),
            strict=True)]
    if prompts:
        given = read_prompt_manifest(Path(prompts))
        rows = [{**r, "prompt": given.get(r["path"], given.get(Path(r["path"]).name,
                                                               r["prompt"]))} for r in rows]
    return sorted(rows, key=lambda r: r["path"])


def read_prompt_manifest(path: Path) -> dict[str, str]:
    """{resolved path and file name: prompt} of a manifest with `path` and `prompt`/`caption`."""
    from pipeline.sources import _read_manifest

    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".csv", ".parquet"):
        raise EvalInputError(f"--prompts {path}: give a .jsonl/.csv/.parquet manifest with "
                             "'path' and 'prompt' (or 'caption') columns")
    try:
        table = _read_manifest(path)
    except SourceError as e:
        raise EvalInputError(str(e)) from None
    key = "prompt" if "prompt" in table.column_names else "caption"
    if key not in table.column_names:
        raise EvalInputError(f"--prompts {path}: no 'prompt' or 'caption' column (columns: "
                             f"{', '.join(table.column_names)})")
    out: dict[str, str] = {}
    for p, text in zip(table.column("path").to_pylist(), table.column(key).to_pylist(),
                       strict=True):
        full = Path(str(p)) if Path(str(p)).is_absolute() else path.parent / str(p)
        out[str(full.resolve())] = out[full.name] = text or ""
    return out


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of each metric over the videos that have it; adherence rates over the videos
    whose prompt asks for that attribute."""
    out: dict[str, Any] = {"videos": len(rows)}
    for m in METRICS:
        vals = [r[m] for r in rows if r.get(m) is not None and not math.isnan(r[m])]
        out[m] = float(np.mean(vals)) if vals else None
    for k in CHECKS:
        asked = [r[f"{k}_ok"] for r in rows if r.get(f"{k}_ok") is not None]
        out[f"{k}_adherence"] = float(np.mean(asked)) if asked else None
    return out


def report_table(report: dict[str, Any]) -> str:
    cols = ["videos", "vanish", "color_flicker", "hist_flicker", "vbench_flicker", "area_cv",
            "morph", "jerk", "color_adherence", "shape_adherence", "direction_adherence"]
    lines = ["| set | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    def cell(v: Any) -> str:
        return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}")
    for name, agg in report["aggregate"].items():
        lines.append(f"| {name} | " + " | ".join(cell(agg.get(c)) for c in cols) + " |")
    if report.get("ratios"):
        lines.append("")
        lines.append("generated / reference: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in report["ratios"].items() if v is not None))
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path | Store) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["vanish", "color_flicker", "hist_flicker", "area_cv", "morph", "jerk",
            "color_adherence", "shape_adherence", "direction_adherence"]
    sets = list(report["aggregate"])
    fig, axes = plt.subplots(1, len(keys), figsize=(2.0 * len(keys), 2.8))
    for ax, key in zip(axes, keys, strict=True):
        vals = [report["aggregate"][s].get(key) or 0.0 for s in sets]
        ax.bar(range(len(sets)), vals, color=["tab:blue", "tab:gray"][: len(sets)])
        ax.set_xticks(range(len(sets)), sets, rotation=30, fontsize=7)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def run_eval(cfg: EvalConfig, videos: str, reference: str | None = None,
             prompts: str | None = None, output: str | Path | None = None,
             address: str | None = None) -> dict[str, Any]:
    """Raises EvalInputError before Ray starts when the videos or prompts cannot be read."""
    import ray

    start = time.perf_counter()
    rows = [{**r, "set": "generated"} for r in video_rows(videos, prompts, cfg.storage)]
    if reference:
        rows += [{**r, "set": "reference"} for r in video_rows(reference, None, cfg.storage)]
    rows = [{**r, **parse_prompt(r["prompt"])} for r in rows]
    scratch = tempfile.TemporaryDirectory(prefix="tubelet-eval-") if output is None else None
    out = output_store(output if output is not None else scratch.name, cfg.storage)
    fs = filesystem_of([r["path"] for r in rows], cfg.storage)  # one S3 filesystem: any bucket

    def graph(c: EvalConfig) -> list[StageSpec]:
        return eval_stages(c, out, fs)

    cfg = sized("eval", cfg, graph, address)  # before Ray
    results: list[dict[str, Any]] = []
    with ray_session(address, cfg.ray):
        cfg = sized("eval", cfg, graph, address)  # a joined cluster's own size
        ds = apply_all(ray.data.from_items(rows, override_num_blocks=max(1, len(rows))),
                       graph(cfg))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            results.extend(batch.to_pylist())
    results.sort(key=lambda r: (r["set"], r["path"]))
    sets = [s for s in ("generated", "reference") if any(r["set"] == s for r in rows)]
    agg = {s: aggregate([r for r in results if r["set"] == s]) for s in sets}
    ratios = {}
    if "reference" in agg:
        for m in RATIO_METRICS:
            g, ref = agg["generated"][m], agg["reference"][m]
            ratios[m] = (g / ref) if g is not None and ref else None
    errors = parquet_files(out.child("errors"))
    report = {"aggregate": agg, "ratios": ratios, "per_video": results,
              "errors": pds.dataset([e.path for e in errors], filesystem=errors[0].fs)
              .to_table().to_pylist() if errors else [],
              "inputs": len(rows), "wall_seconds": round(time.perf_counter() - start, 2),
              "config": asdict(cfg)}
    if scratch is not None:
        scratch.cleanup()
    else:
        out.child("eval.json").write_text(redact(json.dumps(report, indent=2, default=str)))
        out.child("eval.md").write_text(report_table(report) + "\n")
        plot_report(report, out.child("eval.png"))
        write_run_record(out, "eval", cfg, videos=redact(videos),
                         reference=redact(reference) if reference else None,
                         prompts=prompts, aggregate=agg, wall_seconds=report["wall_seconds"])
    return report

