"""Write stage: latent rows in, one Parquet file per batch in the latent dataset out.

Reads the data-contract columns (docs/design.md) and writes them to
`LATENTS_DIR/part-<hash of the batch's ids>.parquet`, written to a temp name and renamed, so a
file is either whole or absent: after a `kill -9`, a rerun finds exactly the clips of whole
files and redoes the rest (every clip exactly once). Returns one small stats row per bucket
for progress and the summary; the latents themselves never travel to the driver.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds

from actors.common.errors import write_atomic
from actors.common.schema import LATENT_COLUMNS, TEXT_COLUMNS, require_columns
from actors.common.stage import StageSpec
from actors.common.storage import Store, resolve

STATS_SCHEMA = pa.schema([
    ("bucket", pa.string()),
    ("decode_node", pa.string()),
    ("clips", pa.int64()),
    ("frames", pa.int64()),
    ("decode_seconds", pa.float64()),
    ("encode_seconds", pa.float64()),
    ("write_seconds", pa.float64()),
])


class LatentWriter:
    READS = LATENT_COLUMNS + ("decode_node", "decode_seconds", "encode_seconds")
    WRITES = tuple(STATS_SCHEMA.names)

    @classmethod
    def spec(cls, cfg: Any, latents_dir: str | Store) -> StageSpec:
        """From a preprocess config: its `write` pool, writing into `latents_dir` (with a
        pipeline `model`, the caption features too)."""
        columns = LATENT_COLUMNS + (TEXT_COLUMNS if getattr(cfg, "model", "") else ())
        return StageSpec("write", cls, dict(latents_dir=latents_dir, columns=columns),
                         cfg.write)

    def __init__(self, latents_dir: str | Store, columns: tuple[str, ...] = LATENT_COLUMNS):
        self.dir = latents_dir if isinstance(latents_dir, Store) else resolve(latents_dir)
        self.columns = tuple(columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS + self.columns, "write")
        if batch.num_rows == 0:
            return STATS_SCHEMA.empty_table()
        start = time.perf_counter()
        ids = batch.column("id").to_pylist()
        name = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24]
        write_atomic(batch.select(self.columns), self.dir.child(f"part-{name}.parquet"))
        took = (time.perf_counter() - start) / batch.num_rows
        rows: dict[tuple[str, str], dict] = {}
        for r in batch.select(("bucket", "decode_node", "num_frames", "decode_seconds",
                               "encode_seconds")).to_pylist():
            s = rows.setdefault((r["bucket"], r["decode_node"]),
                                dict.fromkeys(STATS_SCHEMA.names, 0))
            s.update(bucket=r["bucket"], decode_node=r["decode_node"], clips=s["clips"] + 1,
                     frames=s["frames"] + r["num_frames"],
                     decode_seconds=s["decode_seconds"] + r["decode_seconds"],
                     encode_seconds=s["encode_seconds"] + r["encode_seconds"],
                     write_seconds=s["write_seconds"] + took)
        return pa.Table.from_pylist(list(rows.values()), schema=STATS_SCHEMA)


def parquet_files(folder: str | Path | Store, prefix: str = "") -> list[Store]:
    """The `*.parquet` files directly in `folder` (local or in an object store) whose names
    start with `prefix` (temp files, `.name.tmp-...`, are not listed)."""
    store = folder if isinstance(folder, Store) else resolve(folder)
    return [f for f in store.files(recursive=False)
            if f.name.endswith(".parquet") and f.name.startswith(prefix)
            and not f.name.startswith(".")]


def read_parquet_column(files: list[Store], column: str) -> list:
    """One column of every file in `files` (they share one filesystem)."""
    if not files:
        return []
    data = pds.dataset([f.path for f in files], format="parquet", filesystem=files[0].fs)
    return data.to_table(columns=[column]).column(column).to_pylist()


def read_ids(latents_dir: str | Path | Store) -> list[str]:
    """Ids of every clip in a latent dataset (only the `id` column is read)."""
    return read_parquet_column(parquet_files(latents_dir, "part-"), "id")


def read_error_paths(errors_dir: str | Path | Store) -> set[str]:
    return set(read_parquet_column(parquet_files(errors_dir), "path"))
