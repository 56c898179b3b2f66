"""The prompt file of `tubelet generate`: read, fill in defaults, check, name outputs safely.

FILE is `.txt` (one prompt per non-empty line) or `.jsonl` / `.csv` / `.parquet` with a
`prompt` column and optional per-row `id`, `height`, `width`, `frames`, `fps`, `seed`, `steps`,
`cfg`, `negative_prompt`. A row's missing setting takes the job's default (config or flag), so
requests of different sizes and lengths share one job.

Everything here runs before Ray starts: a bad row is one `PromptError` line naming the file,
the row (its line number) and what to write instead; nothing is generated until every row is
good. Sizes are *rejected*, not snapped: a snapped size would silently differ from what was
asked; the message names the nearest valid value.

Ids: the row's `id`, else `<line>` zero-padded (stable across reruns of the same file, which is
what resume keys on). Duplicate ids are an error naming them. `safe_name(id)` is what a video's
file is called: ASCII letters, digits, `-`, `_` and `.` only, no leading dot, at most 80
characters, plus a hash of the id when anything was changed, so distinct ids never collide
and no id can write outside the output folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import UsageError

SETTINGS = ("height", "width", "frames", "fps", "seed", "steps", "cfg", "negative_prompt")
INT_SETTINGS = ("height", "width", "frames", "seed", "steps")
MAX_NAME = 80


class PromptError(UsageError):
    """A prompt file the user can fix; the message is one line."""


@dataclass
class Defaults:
    """The job's settings for rows that do not give their own (config keys of generate)."""

    height: int = 128
    width: int = 128
    frames: int = 9
    fps: float = 8.0
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    negative_prompt: str = ""

    def validate(self) -> None:
        row = {k: getattr(self, k) for k in SETTINGS}
        problem = check_settings(row)
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class Grid:
    """What sizes a model can make: pixels per latent cell x cells per token, and time."""

    spatial: int  # VAE spatial factor x patch (height and width must be multiples)
    temporal: int  # VAE temporal factor: frames = 1 + temporal * k
    patch_t: int  # latent frames (1 + k) must be a multiple of this

    def nearest_side(self, n: int) -> int:
        return max(self.spatial, round(n / self.spatial) * self.spatial)

    def frames_ok(self, f: int) -> bool:
        return f >= 1 and (f - 1) % self.temporal == 0 and ((f - 1) // self.temporal + 1) \
            % self.patch_t == 0

    def nearest_frames(self, f: int) -> int:
        ok = [g for g in range(1, max(f, 1) * 2 + 4 * self.temporal * self.patch_t)
              if self.frames_ok(g)]
        return min(ok, key=lambda g: (abs(g - f), g))

    def tokens(self, row: dict[str, Any]) -> int:
        """DiT tokens of a (checked) row's video: latent frames / pt x (H / s) x (W / s)."""
        latent_frames = (row["frames"] - 1) // self.temporal + 1
        return (latent_frames // self.patch_t) * (row["height"] // self.spatial) \
            * (row["width"] // self.spatial)

    def check(self, row: dict[str, Any]) -> str:
        """'' if the row's size fits, else what is wrong and the nearest valid value."""
        for side in ("height", "width"):
            n = row[side]
            if n % self.spatial:
                return (f"{side} {n} is not a multiple of {self.spatial} (VAE x patch); "
                        f"nearest valid: {self.nearest_side(n)}")
        if not self.frames_ok(row["frames"]):
            return (f"frames {row['frames']} is not 1 + {self.temporal}k with (1 + k) a "
                    f"multiple of {self.patch_t}; nearest valid: "
                    f"{self.nearest_frames(row['frames'])}")
        return ""


def check_settings(row: dict[str, Any]) -> str:
    """'' or what is impossible about a row's settings (whatever the model)."""
    for k in ("height", "width", "frames", "steps"):
        if row[k] < 1:
            return f"{k} must be >= 1, got {row[k]}"
    if row["height"] % 2 or row["width"] % 2:
        return "height and width must be even (mp4's yuv420p)"
    if not (math.isfinite(row["fps"]) and row["fps"] > 0):
        return f"fps must be > 0, got {row['fps']}"
    if not (math.isfinite(row["cfg"]) and row["cfg"] >= 0):
        return f"cfg must be >= 0, got {row['cfg']}"
    if row["steps"] > 1000:
        return f"steps must be <= 1000, got {row['steps']}"
    if not 0 <= row["seed"] < 2**63:
        return f"seed must be in [0, 2**63), got {row['seed']}"
    return ""


def safe_name(id_: str) -> str:
    """A file name for `id_` that stays inside the output folder (see the module docstring)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", id_).lstrip(".")[:MAX_NAME] or "_"
    if name != id_:
        name = f"{name[:MAX_NAME - 13]}-{hashlib.sha256(id_.encode()).hexdigest()[:12]}"
    return name


def _raw_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, fields) of each row. Line numbers are 1-based lines of the file (csv:
    the header is line 1; parquet: row index + 1)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(n, {"prompt": ln.strip()}) for n, ln in enumerate(lines, 1) if ln.strip()]
        if suffix == ".jsonl":
            rows = []
            for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not ln.strip():
                    continue
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError as e:
                    raise PromptError(f"{path}: line {n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise PromptError(f"{path}: line {n}: expected a JSON object with "
                                      "'prompt'")
                rows.append((n, row))
            return rows
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return [(reader.line_num, {k: v for k, v in r.items() if v not in ("", None)})
                        for r in reader]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [(i + 1, {k: v for k, v in r.items() if v is not None})
                    for i, r in enumerate(table.to_pylist())]
    except (UnicodeDecodeError, OSError, ValueError) as e:
        if isinstance(e, PromptError):
            raise
        raise PromptError(f"{path}: cannot read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    raise PromptError(f"{path}: unknown prompt file type {suffix!r}; use .txt (one prompt per "
                      "line), .jsonl, .csv or .parquet with a 'prompt' column")


def _typed(value: Any, key: str) -> Any:
    if key in INT_SETTINGS:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if key in ("fps", "cfg"):
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if not isinstance(value, str):
        raise ValueError
    return value


def read_prompts(path: str | Path, defaults: Defaults, grid: Grid) -> list[dict[str, Any]]:
    """Every row of the prompt file, with defaults filled in and checked, or one PromptError.

    Each row: id, name (safe file stem), line, prompt and every key of SETTINGS."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found")
    rows: list[dict[str, Any]] = []
    for line, raw in _raw_rows(path):
        where = f"{path}: line {line}"
        unknown = sorted(set(raw) - {"prompt", "id", *SETTINGS})
        if unknown:
            raise PromptError(f"{where}: unknown field(s) {unknown}; known: prompt, id, "
                              f"{', '.join(SETTINGS)}")
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"{where}: empty or missing prompt")
        row: dict[str, Any] = {"line": line, "prompt": prompt.strip()}
        for key in SETTINGS:
            value = raw.get(key, getattr(defaults, key))
            try:
                row[key] = _typed(value, key)
            except (TypeError, ValueError):
                raise PromptError(f"{where}: {key} {value!r} is not "
                                  f"{'an integer' if key in INT_SETTINGS else 'a number'}"
                                  ) from None
        problem = check_settings(row) or grid.check(row)
        if problem:
            raise PromptError(f"{where}: {problem}")
        row["id"] = str(raw["id"]) if "id" in raw else f"{line:05d}"
        if not row["id"] or "\x00" in row["id"]:
            raise PromptError(f"{where}: id {row['id']!r} is empty or holds a NUL byte")
        rows.append(row)
    if not rows:
        raise PromptError(f"{path}: no prompts")
    seen: dict[str, int] = {}
    dupes = []
    for r in rows:
        if r["id"] in seen:
            dupes.append(f"{r['id']!r} (lines {seen[r['id']]} and {r['line']})")
        seen.setdefault(r["id"], r["line"])
    if dupes:
        raise PromptError(f"{path}: duplicate id(s) {', '.join(dupes[:5])}"
                          f"{' ...' if len(dupes) > 5 else ''}; ids must be unique")
    names: dict[str, str] = {}
    for r in rows:
        r["name"] = safe_name(r["id"])
        if names.setdefault(r["name"].lower(), r["id"]) != r["id"]:  # case-insensitive disks
            raise PromptError(f"{path}: ids {names[r['name'].lower()]!r} and {r['id']!r} map "
                              "to the same file name; make them differ by more than case")
    return rows
