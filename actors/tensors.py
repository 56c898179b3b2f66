"""Tensors in Arrow columns: a binary column of raw bytes plus a `<name>_shape` list column.

Why not Ray's tensor extension in flight: with Ray 2.60, `ArrowTensorArray.from_numpy` fails
on a batch of clips whose shapes differ but share a leading dim (it tries np.stack, then
np.array(dtype=object), which broadcasts and raises), and blocks of fixed and variable shape
do not concatenate. Raw bytes + shape has neither problem, costs one memcpy, needs no Ray to
read, and is the same layout as the on-disk contract (flat values + `<name>_shape`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def pack(name: str, arrays: list[np.ndarray]) -> dict[str, pa.Array]:
    """{name: large_binary of C-order bytes, name_shape: list<int32>} for a list of arrays."""
    data = pa.array([np.ascontiguousarray(a).tobytes() for a in arrays], type=pa.large_binary())
    shapes = pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int32()))
    return {name: data, f"{name}_shape": shapes}


def unpack(table: pa.Table, name: str, dtype: np.dtype | type) -> list[np.ndarray]:
    """Inverse of `pack`: one ndarray per row (read-only views where Arrow allows)."""
    shapes = table.column(f"{name}_shape").to_pylist()
    blobs = table.column(name).to_pylist()
    return [np.frombuffer(b, dtype=dtype).reshape(s) for b, s in zip(blobs, shapes, strict=True)]


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` appended (or replaced when the name exists)."""
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table
