"""The data contract between stages (docs/design.md), written once, and the one input check.

`LATENT_COLUMNS` are the columns of the latent dataset on disk (one row per clip): the write
stage writes exactly these, training reads them (its `Collate` takes a subset). Every stage
declares the columns it reads (`READS`) and calls `require_columns` first, so a table missing
one fails with a single line naming the stage, the columns and what it has.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

# The latent dataset: `latent` is a flat float16 list, `latent_shape` its (C, T, H, W).
LATENT_COLUMNS = ("id", "path", "caption", "bucket", "fps", "num_frames", "height", "width",
                  "start", "latent", "latent_shape")
# What training reads before any latent: enough to plan batches.
INDEX_COLUMNS = ("id", "bucket", "latent_shape")


class MissingColumns(ValueError):
    """A stage got a table without a column it reads (a wiring bug or a foreign dataset)."""


def require_columns(batch: pa.Table, columns: Iterable[str], stage: str) -> None:
    """Raise one MissingColumns line if `batch` lacks any of `columns`."""
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise MissingColumns(f"{stage}: input rows lack column(s) {missing}; have "
                             f"{batch.column_names} (is the stage wired after the one that "
                             "writes them?)")
