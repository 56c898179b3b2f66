"""Tensors in Arrow columns (actors/common/tensors.py): bytes + shape, one copy in, none out."""

import numpy as np
import pyarrow as pa

from actors.common.tensors import pack, unpack


def test_pack_unpack_round_trip_across_dtypes_shapes_slices_and_chunks():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (3, 5, 7, 3), dtype=np.uint8),
              rng.integers(0, 255, (1, 2, 2, 3), dtype=np.uint8),
              np.zeros((0, 4, 4, 3), np.uint8),  # an empty clip keeps its shape
              rng.integers(0, 255, (2, 9, 4, 3), dtype=np.uint8)]
    table = pa.table(pack("frames", arrays))
    assert table.column("frames").type == pa.large_binary()
    assert table.column("frames_shape").to_pylist() == [list(a.shape) for a in arrays]
    for got, want in zip(unpack(table, "frames", np.uint8), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    # a slice (non-zero offset) and a table of several chunks, as Ray Data hands them over
    two = pa.concat_tables([table.slice(1, 2), table])
    got = unpack(two, "frames", np.uint8)
    for g, w in zip(got, arrays[1:3] + arrays, strict=True):
        np.testing.assert_array_equal(g, w)
    floats = [rng.standard_normal((4, 2, 3, 3)).astype(np.float16) for _ in range(3)]
    for g, w in zip(unpack(pa.table(pack("latent", floats)), "latent", np.float16), floats,
                    strict=True):
        np.testing.assert_array_equal(g, w)


def test_unpacked_arrays_are_read_only_views():
    table = pa.table(pack("frames", [np.ones((2, 2, 2, 3), np.uint8)]))
    (view,) = unpack(table, "frames", np.uint8)
    assert not view.flags.writeable
