"""Tensors in Arrow columns: a binary column of raw bytes plus a `<name>_shape` list column.

Why not Ray's tensor extension in flight: with Ray 2.60, `ArrowTensorArray.from_numpy` fails
on a batch of clips whose shapes differ but share a leading dim (it tries np.stack, then
np.array(dtype=object), which broadcasts and raises), and blocks of fixed and variable shape
do not concatenate. Raw bytes + shape has neither problem, costs one memcpy in and none out,
needs no Ray to read, and is the same layout as the on-disk contract (flat values +
`<name>_shape`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def pack(name: str, arrays: list[np.ndarray]) -> dict[str, pa.Array]:
    """{name: large_binary of C-order bytes, name_shape: list<int32>} for a list of arrays.

    One copy: each array is written straight into the column's data buffer (building the
    column from per-array `bytes` copied twice and cost ~15% of the decode stage's time)."""
    sizes = [a.nbytes for a in arrays]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:], strict=True):
        data[lo:hi].view(a.dtype).reshape(a.shape)[...] = a
    column = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(arrays), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    shapes = pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int32()))
    return {name: column, f"{name}_shape": shapes}


def unpack(table: pa.Table, name: str, dtype: np.dtype | type) -> list[np.ndarray]:
    """Inverse of `pack`: one read-only ndarray per row, a view of the Arrow buffer (no copy;
    copy it to keep it beyond the table's life or to write to it)."""
    dtype = np.dtype(dtype)
    shapes = table.column(f"{name}_shape").to_pylist()
    out: list[np.ndarray] = []
    for chunk in table.column(name).chunks:
        if chunk.null_count:
            raise ValueError(f"column {name!r} has nulls; every row needs its bytes")
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offs = np.frombuffer(offsets, width)[chunk.offset:chunk.offset + len(chunk) + 1]
        for lo, hi in zip(offs[:-1], offs[1:], strict=True):
            shape = shapes[len(out)]
            view = (np.frombuffer(data, dtype, (hi - lo) // dtype.itemsize, lo).reshape(shape)
                    if hi > lo else np.empty(shape, dtype))
            view.flags.writeable = False  # the buffer may be shared (Ray's object store)
            out.append(view)
    return out


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """`table` with `columns` appended (or replaced when the name exists)."""
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table
