"""Training data: the seeded global batch plan, the loader stage, stream batching, collate.

`write_latents` (also used by the train worker and integration tests) writes a small latent
dataset that follows the on-disk contract directly: flat `latent` list<float16> plus
`latent_shape` (C, T, H, W), several files, small row groups, buckets of different shapes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.workers.train_data import (
    BatchPlan,
    Collate,
    PlanLoader,
    StreamBatcher,
    TrainDataConfig,
    read_index,
    split_steps,
)
from models.dit import build_dit
from models.text_encoder import ByteTokenizer

# Three buckets; "c" has fewer clips than any batch size used below.
SHAPES = {"a-9f": (4, 3, 8, 8), "b-5f": (4, 2, 8, 12), "c-9f": (4, 3, 12, 8)}
COUNTS = {"a-9f": 5, "b-5f": 3, "c-9f": 2}
COLORS = ("red", "green", "blue")


def write_latents(out: Path, counts: dict[str, int] = COUNTS, files: int = 2,
                  seed: int = 0) -> Path:
    """Learnable clips: the caption's colour lights one channel, channel 3 holds a wave that
    moves over time; plus a little noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for bucket, n in counts.items():
        C, T, H, W = SHAPES[bucket]
        yy, xx = np.linspace(-1, 1, H)[:, None], np.linspace(-1, 1, W)[None]
        for i in range(n):
            color = COLORS[i % 3]
            lat = np.zeros((C, T, H, W), np.float32)
            lat[COLORS.index(color)] = 1.0
            for t in range(T):
                lat[3, t] = np.sin(3 * xx + 0.5 * t + i) * np.cos(2 * yy)
            lat += 0.05 * rng.standard_normal(lat.shape)
            rows.append({"id": f"{bucket}-{i:03d}", "path": f"v/{bucket}-{i}.mp4",
                         "caption": f"a {color} square", "bucket": bucket, "fps": 8.0,
                         "num_frames": 4 * T - 3, "height": 8 * H, "width": 8 * W, "start": 0.0,
                         "latent": lat.astype(np.float16).ravel(),
                         "latent_shape": list(lat.shape)})
    out.mkdir(parents=True, exist_ok=True)
    types = {"fps": pa.float32(), "num_frames": pa.int32(), "height": pa.int32(),
             "width": pa.int32(), "latent": pa.list_(pa.float16()),
             "latent_shape": pa.list_(pa.int32())}
    for k in range(files):
        part = rows[k::files]
        table = pa.table({c: pa.array([r[c] for r in part], types.get(c)) for c in rows[0]})
        pq.write_table(table, out / f"part-{k}.parquet", row_group_size=2)
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("latents"))


def index_of(counts: dict[str, int]) -> pa.Table:
    ids = [f"{b}-{i:03d}" for b, n in counts.items() for i in range(n)]
    buckets = [b for b, n in counts.items() for _ in range(n)]
    return pa.table({"id": ids, "bucket": buckets})


@settings(max_examples=40, deadline=None)
@given(counts=st.dictionaries(st.sampled_from("abcde"), st.integers(1, 13), min_size=1),
       batch=st.integers(1, 4), world=st.sampled_from([1, 2, 4]), epoch=st.integers(0, 3))
def test_plan_trains_every_sample_once_per_epoch(counts, batch, world, epoch):
    cfg = TrainDataConfig(batch_size=batch * world, seed=7)
    plan = BatchPlan(index_of(counts), cfg, world)
    bucket_of = index_of(counts).column("bucket").to_pylist()
    batches = plan.epoch(epoch)
    assert len(batches) == plan.steps_per_epoch
    real = Counter()
    for b in batches:
        assert len(b.rows) % world == 0 and len(b.rows) <= cfg.batch_size  # same shape per rank
        assert {bucket_of[r] for r in b.rows} == {b.bucket}  # one bucket per batch
        pads = [r for r, w in zip(b.rows, b.weights, strict=True) if w == 0]
        assert len(pads) < world  # padding only rounds up to the number of workers
        assert all(w in (0.0, 1.0) for w in b.weights)
        real.update(r for r, w in zip(b.rows, b.weights, strict=True) if w == 1)
    assert real == Counter(range(sum(counts.values())))  # each sample exactly once: none lost


def test_plan_is_seeded_and_independent_of_the_number_of_workers():
    index = index_of({"a": 9, "b": 6, "c": 2})

    def order(world: int, seed: int, epoch: int) -> list[list[int]]:
        plan = BatchPlan(index, TrainDataConfig(batch_size=4, seed=seed), world)
        return [[r for r, w in zip(b.rows, b.weights, strict=True) if w]
                for b in plan.epoch(epoch)]

    assert order(1, 0, 0) == order(2, 0, 0) == order(4, 0, 0)  # resume on other world sizes
    assert order(1, 0, 0) == order(1, 0, 0)
    assert order(1, 0, 0) != order(1, 0, 1)  # reshuffled every epoch
    assert order(1, 0, 0) != order(1, 1, 0)
    plan = BatchPlan(index, TrainDataConfig(batch_size=4), 1)
    assert plan.batch(plan.steps_per_epoch + 2) == plan.epoch(1)[2]


def test_small_bucket_still_trains_and_batch_sizes_per_bucket():
    plan = BatchPlan(index_of({"big": 8, "tiny": 2}),
                     TrainDataConfig(batch_size=8, bucket_batch_sizes={"big": 4}), 2)
    sizes = sorted((b.bucket, len(b.rows), sum(b.weights)) for b in plan.epoch(0))
    assert sizes == [("big", 4, 4), ("big", 4, 4), ("tiny", 2, 2)]


def test_batch_size_must_divide_by_workers():
    with pytest.raises(ValueError, match="'a'.*global batch size 3 .* 2 workers"):
        BatchPlan(index_of({"a": 4}), TrainDataConfig(batch_size=3), 2)


def test_loader_gives_each_rank_its_slice_in_slot_order(latents):
    index = read_index(latents)
    assert index.num_rows == sum(COUNTS.values())
    cfg = TrainDataConfig(batch_size=4)
    full = pq.read_table(latents).sort_by("id")
    by_id = {r["id"]: r for r in full.to_pylist()}
    loaders = [PlanLoader(index, cfg, 2, r) for r in range(2)]
    plan = loaders[0].plan
    ids = index.column("id").to_pylist()
    for step in range(plan.steps_per_epoch + 1):
        parts = [ld(pa.table({"step": [step]})) for ld in loaders]
        assert parts[0].num_rows == parts[1].num_rows
        got = pa.concat_tables(parts)
        want = plan.batch(step)
        assert got.column("id").to_pylist() == [ids[r] for r in want.rows]
        assert got.column("slot").to_pylist() == list(range(len(want.rows)))
        assert got.column("weight").to_pylist() == list(want.weights)
        for row in got.to_pylist():
            assert row["latent"] == by_id[row["id"]]["latent"]  # the clip's own latents
        batch = Collate(ByteTokenizer(64))(parts[1])
        assert batch.step == step and batch.x.shape[0] == parts[1].num_rows
        assert tuple(batch.x.shape[1:]) == SHAPES[want.bucket]


def test_split_steps_regroups_blocks():
    blocks = [pa.table({"step": [0, 0, 1]}), pa.table({"step": [1, 2]}), pa.table({"step": [3]})]
    assert [t.column("step").to_pylist() for t in split_steps(blocks)] == [
        [0, 0], [1, 1], [2], [3]]


def test_stream_batcher_loses_nothing(latents):
    rows = pq.read_table(latents).combine_chunks()
    batcher = StreamBatcher(TrainDataConfig(batch_size=4), world_size=2)
    out = [t for lo in range(0, rows.num_rows, 3) for t in batcher.push(rows.slice(lo, 3))]
    assert all(t.num_rows == 2 for t in out)  # 4 global / 2 workers
    out += list(batcher.drain())
    assert all(len(set(t.column("bucket").to_pylist())) == 1 for t in out)
    assert sorted(i for t in out for i in t.column("id").to_pylist()) == sorted(
        rows.column("id").to_pylist())


def latent_rows(specs, dtype: type = np.float16) -> tuple[pa.Table, list[np.ndarray]]:
    """specs: (id, bucket, (C, T, H, W)) per row -> (rows in the on-disk contract, latents)."""
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal(shape).astype(np.float32) for _, _, shape in specs]
    table = pa.table({
        "id": [i for i, _, _ in specs], "caption": [f"clip {i}" for i, _, _ in specs],
        "bucket": [b for _, b, _ in specs], "fps": pa.array([24.0] * len(specs), pa.float32()),
        "latent": pa.array([z.ravel().astype(dtype) for z in latents],
                           pa.list_(pa.from_numpy_dtype(dtype))),
        "latent_shape": pa.array([list(s) for _, _, s in specs], pa.list_(pa.int32()))})
    return table, latents


def test_collate_makes_one_bucket_a_model_ready_batch():
    table, latents = latent_rows([("a", "5x9x16", (4, 5, 9, 16)), ("b", "5x9x16", (4, 5, 9, 16))])
    tokenizer = ByteTokenizer(16)
    batch = Collate(tokenizer)(table, slot_base=4)
    assert batch.ids == ["a", "b"] and batch.bucket == "5x9x16" and batch.step == -1
    assert batch.x.dtype == torch.float32 and batch.x.shape == (2, 4, 5, 9, 16)
    expected = torch.from_numpy(np.stack(latents)).half().float()  # stored as float16
    torch.testing.assert_close(batch.x, expected)
    assert batch.fps.tolist() == [24.0, 24.0] and batch.weight.tolist() == [1.0, 1.0]
    assert batch.slot == [4, 5]  # a stream batch's slots start at the rank's offset
    ids, mask = tokenizer(["clip a", "clip b"])
    assert torch.equal(batch.text_ids, ids) and torch.equal(batch.text_mask, mask)
    # H = 9 is not a multiple of the patch: the DiT pads and crops it back itself.
    model = build_dit("debug", in_channels=4).eval()
    with torch.no_grad():
        y = model(batch.x, torch.rand(2), fps=batch.fps)
    assert y.shape == batch.x.shape


def test_collate_keeps_float32_latents():
    table, latents = latent_rows([("a", "b0", (2, 1, 4, 4))], dtype=np.float32)
    assert torch.equal(Collate(ByteTokenizer(8))(table).x[0], torch.from_numpy(latents[0]))


def test_collate_refuses_mixed_buckets_and_shapes_naming_ids():
    collate = Collate(ByteTokenizer(8))
    table, _ = latent_rows([("a", "wide", (4, 2, 4, 8)), ("b", "tall", (4, 2, 8, 4))])
    with pytest.raises(ValueError, match=r"one bucket.*'wide': a; 'tall': b"):
        collate(table)
    table, _ = latent_rows([("a", "b0", (4, 2, 4, 8)), ("b", "b0", (4, 3, 4, 8))])
    with pytest.raises(
        ValueError, match=r"mixes latent shapes.*\(4, 2, 4, 8\): a; \(4, 3, 4, 8\): b"
    ):
        collate(table)


def test_collate_refuses_wrong_latent_length_null_fps_and_missing_columns():
    collate = Collate(ByteTokenizer(8))
    table, _ = latent_rows([("a", "b0", (2, 1, 4, 4)), ("b", "b0", (2, 1, 4, 4))])
    short = table.set_column(table.column_names.index("latent"), "latent",
                             pa.array([np.zeros(32), np.zeros(31)], pa.list_(pa.float32())))
    with pytest.raises(ValueError, match=r"latent length does not match.*id\(s\) b"):
        collate(short)
    no_fps = table.set_column(table.column_names.index("fps"), "fps",
                              pa.array([24.0, None], pa.float32()))
    with pytest.raises(ValueError, match=r"null fps for id\(s\) b"):
        collate(no_fps)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['fps'\]"):
        collate(table.drop_columns(["fps"]))
