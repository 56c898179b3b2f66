"""Bucketing and 3D patching: latent rows -> model-ready DiT batches, one bucket each.

Reads the latent dataset's rows (the on-disk contract: a flat `latent` list column plus its
`latent_shape`) and returns torch tensors. A batch that reaches the DiT has one shape, so
`iter_bucket_batches` cuts a table into single-bucket batches and `PatchifyStage` refuses a
batch that mixes buckets or shapes.

Unlike most stages this one ends in torch tensors, not a table: it is the last step before the
model. Call it on a table directly, or as the collate step of Ray Data's `iter_torch_batches`:
Ray hands a `pyarrow.Table` only to a `ray.data.collate_fn.ArrowBatchCollateFn` subclass, so
wrap it in one (in `pipeline/`, keeping this file free of Ray). The output mixes tensors with
lists (ids, captions), so move the tensors to the device yourself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.common.schema import require_columns
from models.patching import check_patch, patchify


def _ids(table: pa.Table, mask: list[bool] | None = None, limit: int = 5) -> str:
    ids = table.column("id").to_pylist()
    if mask is not None:
        ids = [i for i, m in zip(ids, mask, strict=True) if m]
    return ", ".join(map(str, ids[:limit])) + (
        f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    )


def iter_bucket_batches(
    table: pa.Table, batch_size: int, drop_last: bool = False
) -> Iterator[pa.Table]:
    """Single-bucket batches of at most `batch_size` rows, buckets in order of first appearance."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets = table.column("bucket").to_pylist()
    for bucket in dict.fromkeys(buckets):
        rows = table.take([i for i, b in enumerate(buckets) if b == bucket])
        for start in range(0, rows.num_rows, batch_size):
            part = rows.slice(start, batch_size)
            if part.num_rows == batch_size or not drop_last:
                yield part


class PatchifyStage:
    """Latent rows of one bucket -> {"x", "tokens", "positions", "fps", ...} for the DiT.

    Output, for B rows with latent_shape (C, T, H, W) and patch (pt, ph, pw):
      x          (B, C, T, H, W) float32   what `DiT(x, t, ...)` takes
      tokens     (B, N, pt*ph*pw*C)        the same latents cut into tubelets, zero-padded at
      positions  (B, N, 3) int64           the end where T, H, W are not multiples of the
                                           patch; (t, h, w) grid cell of each token
      fps        (B,) float32
      ids, captions  list[str];  bucket  str;  latent_shape  tuple (C, T, H, W)
    tokens/positions are for code that shards the sequence (sequence parallelism); the DiT
    patchifies x itself. `with_tokens=False` skips them.
    """

    READS = ("id", "caption", "bucket", "fps", "latent", "latent_shape")
    WRITES = ("ids", "captions", "bucket", "latent_shape", "x", "fps", "tokens", "positions")

    def __init__(self, patch: tuple[int, ...] = (1, 2, 2), with_tokens: bool = True):
        self.patch = check_patch(patch)
        self.with_tokens = with_tokens

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        require_columns(batch, self.READS, "patchify")
        if batch.num_rows == 0:
            raise ValueError("patchify: empty batch")
        shape = self._one_shape(batch)
        x = torch.from_numpy(self._latents(batch, shape))  # (B, C, T, H, W)
        fps = batch.column("fps").to_pylist()
        if None in fps:
            raise ValueError(
                f"patchify: null fps for id(s) {_ids(batch, [f is None for f in fps])}"
            )
        out: dict[str, Any] = {
            "ids": batch.column("id").to_pylist(),
            "captions": [c or "" for c in batch.column("caption").to_pylist()],
            "bucket": batch.column("bucket")[0].as_py(),
            "latent_shape": shape,
            "x": x,
            "fps": torch.tensor(fps, dtype=torch.float32),
        }
        if self.with_tokens:
            tokens, grid = patchify(x, self.patch)  # (B, N, pt*ph*pw*C)
            out["tokens"] = tokens
            out["positions"] = grid.positions().expand(x.shape[0], -1, -1)  # (B, N, 3)
        return out

    @staticmethod
    def _one_shape(batch: pa.Table) -> tuple[int, int, int, int]:
        """The batch's single latent shape; a clear error if buckets or shapes are mixed."""
        buckets = batch.column("bucket").to_pylist()
        if len(set(buckets)) > 1:
            per = "; ".join(
                f"{b!r}: {_ids(batch, [x == b for x in buckets])}" for b in dict.fromkeys(buckets)
            )
            raise ValueError(
                f"patchify: one batch must hold one bucket, got {len(set(buckets))} ({per}); "
                "cut batches with iter_bucket_batches or group by 'bucket' upstream"
            )
        shapes = [
            tuple(s) if s is not None else None for s in batch.column("latent_shape").to_pylist()
        ]
        if len(set(shapes)) > 1:
            per = "; ".join(
                f"{s}: {_ids(batch, [x == s for x in shapes])}" for s in dict.fromkeys(shapes)
            )
            raise ValueError(
                f"patchify: bucket {buckets[0]!r} mixes latent shapes ({per}); "
                "every clip of a bucket must have the same (C, T, H, W)"
            )
        if shapes[0] is None or len(shapes[0]) != 4 or min(shapes[0]) < 1:
            raise ValueError(
                f"patchify: latent_shape must be (C, T, H, W) positive ints, got {shapes[0]} "
                f"for id(s) {_ids(batch)}"
            )
        return shapes[0]

    @staticmethod
    def _latents(batch: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
        """Flat list column -> (B, C, T, H, W) float32, checking every row's length."""
        column = batch.column("latent").combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            raise ValueError(
                f"patchify: 'latent' must be a flat list<float16|float32> column, got {column.type}"
            )
        lengths = column.value_lengths().to_pylist()  # None for a null row
        bad = [n != math.prod(shape) for n in lengths]
        if any(bad):
            raise ValueError(
                f"patchify: latent length does not match latent_shape {shape} "
                f"(= {math.prod(shape)} values) for id(s) {_ids(batch, bad)}"
            )
        values = column.flatten().to_numpy(zero_copy_only=False)  # astype copies: writable
        return values.astype(np.float32).reshape(batch.num_rows, *shape)
