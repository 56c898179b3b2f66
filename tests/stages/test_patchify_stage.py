"""The bucketing + patchify stage on hand-built latent rows (no Ray)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.patchify import PatchifyStage, iter_bucket_batches
from models.dit import build_dit
from models.patching import PatchGrid, unpatchify


def latent_rows(specs, dtype: type = np.float16):
    """specs: (id, bucket, (C, T, H, W)) per row -> (table in the on-disk contract, latents)."""
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal(shape).astype(np.float32) for _, _, shape in specs]
    table = pa.table(
        {
            "id": [i for i, _, _ in specs],
            "path": [f"/videos/{i}.mp4" for i, _, _ in specs],
            "caption": [f"clip {i}" for i, _, _ in specs],
            "bucket": [b for _, b, _ in specs],
            "fps": pa.array([24.0] * len(specs), pa.float32()),
            "num_frames": [17] * len(specs),
            "height": [s[2] * 8 for _, _, s in specs],
            "width": [s[3] * 8 for _, _, s in specs],
            "latent": pa.array(
                [z.ravel().astype(dtype) for z in latents], pa.list_(pa.from_numpy_dtype(dtype))
            ),
            "latent_shape": pa.array([list(s) for _, _, s in specs], pa.list_(pa.int32())),
        }
    )
    return table, latents


def test_one_bucket_becomes_a_model_ready_batch():
    table, latents = latent_rows([("a", "5x9x16", (4, 5, 9, 16)), ("b", "5x9x16", (4, 5, 9, 16))])
    out = PatchifyStage(patch=(1, 2, 2))(table)
    assert out["ids"] == ["a", "b"] and out["captions"] == ["clip a", "clip b"]
    assert out["bucket"] == "5x9x16" and out["latent_shape"] == (4, 5, 9, 16)
    x = out["x"]
    assert x.dtype == torch.float32 and x.shape == (2, 4, 5, 9, 16)
    expected = torch.from_numpy(np.stack(latents)).half().float()  # stored as float16
    torch.testing.assert_close(x, expected)
    # H = 9 is not a multiple of 2: padded to 10 -> 5 x 5 x 8 tokens of 1*2*2*4 values.
    assert out["tokens"].shape == (2, 5 * 5 * 8, 16)
    assert out["positions"].shape == (2, 200, 3)
    assert out["positions"][0, -1].tolist() == [4, 4, 7]
    assert out["fps"].tolist() == [24.0, 24.0]
    # Tokens are the same latents: they unpatchify back to x.
    torch.testing.assert_close(unpatchify(out["tokens"], PatchGrid((5, 9, 16), (1, 2, 2))), x)
    # ...and the batch drives the DiT as is.
    model = build_dit("debug", in_channels=4).eval()
    with torch.no_grad():
        y = model(out["x"], torch.rand(2), fps=out["fps"])
    assert y.shape == out["x"].shape


def test_float32_latents_and_no_tokens():
    table, latents = latent_rows([("a", "b0", (2, 1, 4, 4))], dtype=np.float32)
    out = PatchifyStage(with_tokens=False)(table)
    assert torch.equal(out["x"][0], torch.from_numpy(latents[0]))
    assert "tokens" not in out and "positions" not in out


def test_mixed_buckets_are_refused_naming_ids_and_buckets():
    table, _ = latent_rows([("a", "wide", (4, 2, 4, 8)), ("b", "tall", (4, 2, 8, 4))])
    with pytest.raises(ValueError, match=r"one bucket.*'wide': a; 'tall': b"):
        PatchifyStage()(table)


def test_mixed_shapes_in_one_bucket_are_refused():
    table, _ = latent_rows([("a", "b0", (4, 2, 4, 8)), ("b", "b0", (4, 3, 4, 8))])
    with pytest.raises(
        ValueError, match=r"mixes latent shapes.*\(4, 2, 4, 8\): a; \(4, 3, 4, 8\): b"
    ):
        PatchifyStage()(table)


def test_wrong_latent_length_and_missing_columns():
    table, _ = latent_rows([("a", "b0", (2, 1, 4, 4)), ("b", "b0", (2, 1, 4, 4))])
    shapes = pa.array([[2, 1, 4, 4], [2, 1, 4, 4]], pa.list_(pa.int32()))
    short = table.set_column(
        table.column_names.index("latent"),
        "latent",
        pa.array([np.zeros(32), np.zeros(31)], pa.list_(pa.float32())),
    ).set_column(table.column_names.index("latent_shape"), "latent_shape", shapes)
    with pytest.raises(ValueError, match="latent length does not match.*id\\(s\\) b"):
        PatchifyStage()(short)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['fps'\]"):
        PatchifyStage()(table.drop_columns(["fps"]))


def test_iter_bucket_batches_cuts_single_bucket_batches():
    specs = [(str(i), "wide" if i % 3 else "tall", (2, 1, 2, 2)) for i in range(8)]
    table, _ = latent_rows(specs)
    batches = list(iter_bucket_batches(table, batch_size=2))
    assert [b.column("id").to_pylist() for b in batches] == [
        ["0", "3"], ["6"], ["1", "2"], ["4", "5"], ["7"],
    ]  # fmt: skip
    kept = list(iter_bucket_batches(table, batch_size=2, drop_last=True))
    assert all(b.num_rows == 2 for b in kept) and len(kept) == 3
    stage = PatchifyStage()
    assert all(len(set(stage(b)["ids"])) == b.num_rows for b in batches)  # every batch is valid
