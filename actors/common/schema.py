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
# A pretrained pipeline's caption features (`preprocess --model`, actors/caption_encode.py):
# `text_features` a flat float32/float16 list of the caption's (n, D) rows at their real length
# n, `text_shape` its (n, D), `text_len` n, `text_encoder` which encoder made them
# (`models.pipelines.text_encoder_id`). Fine-tuning reads them beside LATENT_COLUMNS.
TEXT_COLUMNS = ("text_features", "text_shape", "text_len", "text_encoder")
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
