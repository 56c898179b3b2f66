"""Training data: a seeded global batch plan over the latent dataset, the stage that loads one
worker's rows of a step, and the collate step that turns them into DiT inputs (latents, not
tokens: the DiT patchifies inside its forward).

Why a plan: FSDP workers meet in collectives on every step, so they must all run the same
number of steps, and an exact resume needs `step -> samples` to be a pure function. So the plan
is computed from the dataset index alone (ids + buckets), the seed and the epoch:
  epoch e: each bucket's ids shuffled with rng(seed, e), cut into global batches of the bucket's
  batch size; the batches of all buckets shuffled together with the same rng.
Global step s is batch s % steps_per_epoch of epoch s // steps_per_epoch; worker r of W takes
the r-th contiguous slice of that global batch. The same plan serves 1 worker or 8, so a run
may resume on a different number of workers and still see the same samples in the same order.

Last partial batch of a bucket: kept, never dropped. It becomes a smaller global batch, rounded
up to a multiple of the number of workers with repeats of its own samples that carry zero loss
weight. Every sample is trained on exactly once per epoch, every worker gets the same batch
shape in a step, and a bucket with fewer clips than its batch size still trains (one small
batch per epoch).

Ray Data does the reading: `PlanLoader` is a stage (step numbers in, latent rows out) that
runs in an actor pool ahead of the trainer; without Ray, call it directly.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.common.schema import INDEX_COLUMNS, LATENT_COLUMNS, TEXT_COLUMNS, require_columns
from actors.common.stage import StageSpec
from actors.common.storage import Store, as_store
from models.text_encoder import Tokenizer


@dataclass
class TrainDataConfig:
    batch_size: int = 8  # global batch (all workers together) of every bucket not listed below
    bucket_batch_sizes: dict[str, int] = field(default_factory=dict)  # bucket name -> global
    seed: int = 0  # plan seed: the shuffles of epoch e come from rng(seed, e)
    shuffle: bool = True
    prefetch_steps: int = 4  # steps loaded ahead of the trainer
    # Who reads a rank's planned rows (--data only): "ray", Ray Data PlanLoader actors (the
    # loading overlaps training on another process or node); "worker", the Train worker
    # itself, in a prefetch thread. Same plan, same batches. For a small model a step is
    # short and Ray Data's executor thread inside the worker (a scheduling loop that records
    # metrics every round, holding the GIL) costs more than the load: measured on 2 cores,
    # the demo DiT at 0.93-1.3 s/step with "ray" and 0.41 with "worker".
    loader: Literal["ray", "worker"] = "ray"

    def validate(self) -> None:
        bad = {k: v for k, v in self.bucket_batch_sizes.items() if v < 1}
        if self.batch_size < 1 or bad:
            raise ValueError(f"batch_size and bucket_batch_sizes: must be >= 1, got "
                             f"{self.batch_size} and {bad}")
        if self.prefetch_steps < 1:
            raise ValueError(f"prefetch_steps: must be >= 1, got {self.prefetch_steps}")

    def batch_size_of(self, bucket: str) -> int:
        return self.bucket_batch_sizes.get(bucket, self.batch_size)


def latent_files(latents: str | Path | Store) -> list[Store]:
    """The Parquet files of a latent dataset: a file, or every *.parquet under a folder (a
    local path or an object-store prefix)."""
    store = as_store(latents)
    files = [store] if store.is_file() else [
        f for f in store.files() if f.name.endswith(".parquet") and not f.name.startswith(".")]
    if not files:
        raise FileNotFoundError(
            f"no latent dataset at {store}: expected Parquet files (run `tubelet preprocess` "
            "and pass its DIR/latents)")
    return files


def read_index(latents: str | Path | Store) -> pa.Table:
    """One row per clip: id, bucket, latent_shape, and where it lives (file: its path in the
    dataset's filesystem, row). Sorted by id so the plan does not depend on file order; a
    repeated id keeps its first copy."""
    parts = []
    for f in latent_files(latents):
        with f.fs.open_input_file(f.path) as handle:
            meta = pq.ParquetFile(handle)
            missing = [c for c in LATENT_COLUMNS if c not in meta.schema_arrow.names]
            if missing:
                raise ValueError(f"{f}: not a latent dataset file, lacks column(s) {missing}")
            t = meta.read(columns=list(INDEX_COLUMNS))
        parts.append(t.append_column("file", pa.array([f.path] * t.num_rows))
                      .append_column("row", pa.array(np.arange(t.num_rows), pa.int64())))
    index = pa.concat_tables(parts).sort_by("id")
    ids = index.column("id").to_numpy(zero_copy_only=False)
    keep = np.ones(len(ids), bool)
    keep[1:] = ids[1:] != ids[:-1]
    return index.filter(pa.array(keep))


@dataclass(frozen=True)
class PlannedBatch:
    bucket: str
    rows: tuple[int, ...]  # index rows in slot order; length is a multiple of world_size
    weights: tuple[float, ...]  # 1.0 for a sample, 0.0 for padding

    def part(self, rank: int, world_size: int) -> slice:
        k = len(self.rows) // world_size
        return slice(rank * k, (rank + 1) * k)


class BatchPlan:
    """step -> the global batch of that step (module docstring). Pure: same inputs, same plan."""

    def __init__(self, index: pa.Table, cfg: TrainDataConfig, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self.buckets: dict[str, np.ndarray] = {}
        for i, b in enumerate(index.column("bucket").to_pylist()):
            self.buckets.setdefault(b, []).append(i)
        self.buckets = {b: np.array(r) for b, r in sorted(self.buckets.items())}
        for b in self.buckets:
            if cfg.batch_size_of(b) % world_size:
                raise ValueError(
                    f"bucket {b!r}: global batch size {cfg.batch_size_of(b)} is not divisible "
                    f"by {world_size} workers; set data.batch_size / data.bucket_batch_sizes to "
                    "a multiple of the number of workers")
        self.steps_per_epoch = sum(math.ceil(len(r) / cfg.batch_size_of(b))
                                   for b, r in self.buckets.items())
        key = "\n".join(f"{i}\t{b}" for i, b in zip(index.column("id").to_pylist(),
                                                   index.column("bucket").to_pylist(), strict=True))
        self.fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
        self._epochs: OrderedDict[int, list[PlannedBatch]] = OrderedDict()

    def epoch(self, e: int) -> list[PlannedBatch]:
        if e not in self._epochs:
            self._epochs[e] = self._make_epoch(e)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _make_epoch(self, e: int) -> list[PlannedBatch]:
        rng = np.random.default_rng([self.cfg.seed, e])
        batches = []
        for bucket, rows in self.buckets.items():
            order = rng.permutation(rows) if self.cfg.shuffle else rows
            size = self.cfg.batch_size_of(bucket)
            for lo in range(0, len(order), size):
                real = [int(r) for r in order[lo:lo + size]]
                padded = -len(real) % self.world_size  # zero-weight repeats: same shape per rank
                rows_ = real + [real[i % len(real)] for i in range(padded)]
                batches.append(PlannedBatch(bucket, tuple(rows_),
                                            (1.0,) * len(real) + (0.0,) * padded))
        if self.cfg.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batch(self, step: int) -> PlannedBatch:
        return self.epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]


class PlanLoader:
    """Stage: step numbers in, this worker's latent rows of those steps out (in step order).

    Reads `step`; writes the latent contract columns plus `step`, `slot` (position in the
    global batch: seeds the noise) and `weight`. Reads whole Parquet row groups and keeps the
    most recently used ones up to `cache_mb` of Arrow memory, so a latent dataset that fits
    is read from disk once (a shuffled plan touches ~every file each step: measured, a
    16-group cache over 100 small files kept one of the 2 cores busy decoding Parquet).
    """

    READS = ("step",)
    WRITES = LATENT_COLUMNS + ("step", "slot", "weight")

    @classmethod
    def spec(cls, cfg: Any, index: pa.Table, rank: int, fs: Any = None) -> StageSpec:
        """From a train config (pipeline/train.py `TrainConfig`): its `data:` section, worker
        count and `loader` pool, for Ray Train worker `rank`; `fs`: the dataset's filesystem
        (an object store's; None: local files)."""
        return StageSpec("loader", cls, dict(index=index, data=cfg.data,
                                             world_size=cfg.num_workers, rank=rank,
                                             columns=data_columns(cfg), fs=fs), cfg.loader)

    def __init__(self, index: pa.Table, data: TrainDataConfig, world_size: int, rank: int,
                 cache_mb: float = 512, columns: tuple[str, ...] = LATENT_COLUMNS,
                 fs: Any = None):
        self.index, self.rank, self.world_size, self.fs = index, rank, world_size, fs
        self.columns = tuple(columns)  # + TEXT_COLUMNS when fine-tuning a pipeline
        self.plan = BatchPlan(index, data, world_size)
        self.files = index.column("file").to_pylist()
        self.rows = index.column("row").to_numpy()
        self.cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self.cache_bytes, self.cached_bytes = int(cache_mb * 2**20), 0
        self.groups: dict[str, np.ndarray] = {}  # file -> first row of each row group

    def _open(self, file: str) -> Any:
        return self.fs.open_input_file(file) if self.fs is not None else file

    def _row_group(self, file: str, row: int) -> tuple[pa.Table, int]:
        if file not in self.groups:
            meta = pq.ParquetFile(self._open(file)).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.groups[file] = np.concatenate([[0], np.cumsum(sizes)])
        starts = self.groups[file]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        if (file, g) not in self.cache:
            group = pq.ParquetFile(self._open(file)).read_row_group(g, columns=list(self.columns))
            self.cache[(file, g)] = group
            self.cached_bytes += group.nbytes
            while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
                self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        self.cache.move_to_end((file, g))
        return self.cache[(file, g)], row - int(starts[g])

    def load_step(self, step: int) -> pa.Table:
        batch = self.plan.batch(step)
        part = batch.part(self.rank, self.world_size)
        slots = range(len(batch.rows))[part]
        rows = [self._row_group(self.files[i], int(self.rows[i])) for i in batch.rows[part]]
        tables = [t.slice(r, 1) for t, r in rows]
        for column in ("latent", "text_features"):
            types = {t.schema.field(column).type for t in tables
                     if column in t.column_names}
            if len(types) > 1:  # float16 and float32 files mixed: one type per batch
                tables = [_cast(t, column, pa.list_(pa.float32())) for t in tables]
        out = pa.concat_tables(tables).combine_chunks()
        n = out.num_rows
        return (out.append_column("step", pa.array([step] * n, pa.int64()))
                .append_column("slot", pa.array(list(slots), pa.int64()))
                .append_column("weight", pa.array(batch.weights[part], pa.float32())))

    def __call__(self, steps: pa.Table) -> pa.Table:
        require_columns(steps, self.READS, "PlanLoader")
        return pa.concat_tables([self.load_step(s) for s in steps.column("step").to_pylist()])


def _cast(table: pa.Table, column: str, type_: pa.DataType) -> pa.Table:
    i = table.column_names.index(column)
    return table.set_column(i, column, table.column(column).cast(type_))


def data_columns(cfg: Any) -> tuple[str, ...]:
    """The dataset columns a train config reads: the latents, and the caption features when
    it fine-tunes a pretrained pipeline (`finetune.init`)."""
    return LATENT_COLUMNS + (TEXT_COLUMNS if cfg.finetune.init else ())


def split_steps(blocks: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Regroup a stream of row blocks (in step order) into one table per step."""
    pending: list[pa.Table] = []
    for block in blocks:
        steps = block.column("step").to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(steps)) + 1).tolist(), len(steps)]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            part = block.slice(lo, hi - lo)
            if pending and pending[0].column("step")[0] != part.column("step")[0]:
                yield pa.concat_tables(pending)
                pending = []
            pending.append(part)
    if pending:
        yield pa.concat_tables(pending)


class StreamBatcher:
    """For a stream of latent rows in arrival order (the pipelined `--input` path): buffers per
    bucket and emits single-bucket batches of `batch_size_of(bucket) // world_size` rows; at the
    end of the stream `drain` emits each bucket's remainder as a smaller batch (nothing lost)."""

    def __init__(self, data: TrainDataConfig, world_size: int):
        self.data, self.world_size = data, world_size
        self.buffers: dict[str, list[pa.Table]] = defaultdict(list)

    def size(self, bucket: str) -> int:
        return max(1, self.data.batch_size_of(bucket) // self.world_size)

    def push(self, table: pa.Table) -> Iterator[pa.Table]:
        table = table.select(LATENT_COLUMNS)
        buckets = table.column("bucket").to_pylist()
        for b in dict.fromkeys(buckets):
            self.buffers[b].append(table.filter(pa.array([x == b for x in buckets])))
            rows = pa.concat_tables(self.buffers[b])
            n = self.size(b)
            full = rows.num_rows // n * n
            for lo in range(0, full, n):
                yield rows.slice(lo, n)
            self.buffers[b] = [rows.slice(full)] if full < rows.num_rows else []

    def drain(self) -> Iterator[pa.Table]:
        for _, parts in sorted(self.buffers.items()):
            if parts:
                yield pa.concat_tables(parts)
        self.buffers.clear()


@dataclass
class StepBatch:
    """One worker's model inputs for one step (one bucket, one shape)."""

    step: int
    bucket: str
    ids: list[str]
    x: torch.Tensor  # (B, C, T, H, W) float32 latents
    fps: torch.Tensor  # (B,)
    text_ids: torch.Tensor  # (B, L) caption tokens (the text encoder's tokenizer)
    text_mask: torch.Tensor  # (B, L) bool
    weight: torch.Tensor  # (B,) 1 = sample, 0 = padding
    slot: list[int]  # position in the global batch: seeds each sample's noise
    # (B, L, D) float32 precomputed caption features (a pretrained pipeline's, `preprocess
    # --model`), zeros after each caption's rows; then text_ids is empty and text_mask marks
    # the real rows
    text: torch.Tensor | None = None

    def to(self, device: torch.device) -> StepBatch:
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items()
                 if torch.is_tensor(v)}
        return StepBatch(**{**vars(self), **moved})


def _ids(table: pa.Table, mask: list[bool] | None = None, limit: int = 5) -> str:
    ids = table.column("id").to_pylist()
    if mask is not None:
        ids = [i for i, m in zip(ids, mask, strict=True) if m]
    return ", ".join(map(str, ids[:limit])) + (
        f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def _one_shape(table: pa.Table) -> tuple[int, int, int, int]:
    """The batch's single latent shape; a clear error if buckets or shapes are mixed (a batch
    that reaches the DiT has one shape)."""
    buckets = table.column("bucket").to_pylist()
    if len(set(buckets)) > 1:
        per = "; ".join(f"{b!r}: {_ids(table, [x == b for x in buckets])}"
                        for b in dict.fromkeys(buckets))
        raise ValueError(
            f"collate: one batch must hold one bucket, got {len(set(buckets))} ({per}); "
            "cut batches with BatchPlan or StreamBatcher, which group by 'bucket'")
    shapes = [tuple(s) if s is not None else None
              for s in table.column("latent_shape").to_pylist()]
    if len(set(shapes)) > 1:
        per = "; ".join(f"{s}: {_ids(table, [x == s for x in shapes])}"
                        for s in dict.fromkeys(shapes))
        raise ValueError(f"collate: bucket {buckets[0]!r} mixes latent shapes ({per}); every "
                         "clip of a bucket must have the same (C, T, H, W)")
    if shapes[0] is None or len(shapes[0]) != 4 or min(shapes[0]) < 1:
        raise ValueError(f"collate: latent_shape must be (C, T, H, W) positive ints, got "
                         f"{shapes[0]} for id(s) {_ids(table)}")
    return shapes[0]


def _latents(table: pa.Table, shape: tuple[int, ...]) -> np.ndarray:
    """Flat list column -> (B, C, T, H, W) float32, checking every row's length."""
    column = table.column("latent").combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ValueError(
            f"collate: 'latent' must be a flat list<float16|float32> column, got {column.type}")
    bad = [n != math.prod(shape) for n in column.value_lengths().to_pylist()]  # None: null row
    if any(bad):
        raise ValueError(f"collate: latent length does not match latent_shape {shape} "
                         f"(= {math.prod(shape)} values) for id(s) {_ids(table, bad)}")
    values = column.flatten().to_numpy(zero_copy_only=False)  # astype copies: writable
    return values.astype(np.float32).reshape(table.num_rows, *shape)


def _features(table: pa.Table, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' precomputed caption features -> (B, length, D) float32, zeros after each
    caption's n rows, and the (B, length) mask of its rows (n > length is refused)."""
    shapes = [tuple(s) for s in table.column("text_shape").to_pylist()]
    dims = {s[1] for s in shapes}
    if len(dims) != 1:
        raise ValueError(f"collate: caption features of widths {sorted(dims)} in one batch "
                         f"(id(s) {_ids(table)}); preprocess with one --model")
    lengths = [s[0] for s in shapes]
    if max(lengths) > length:
        raise ValueError(f"collate: caption features of {max(lengths)} rows, more than the "
                         f"model's text length {length} (id(s) {_ids(table)})")
    values = table.column("text_features").combine_chunks().flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32)
    text = torch.zeros(table.num_rows, length, dims.pop())
    lo = 0
    for i, (n, d) in enumerate(shapes):
        text[i, :n] = torch.from_numpy(flat[lo:lo + n * d].reshape(n, d))
        lo += n * d
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return text, mask


class Collate:
    """Latent rows of one bucket (+ step, slot, weight when planned) -> StepBatch, the last step
    before the model. A batch that mixes buckets or shapes, or whose latents do not match
    their `latent_shape`, is refused naming the ids. `tokenizer`:
    `models.text_encoder.caption_tokenizer` (bytes, or a pretrained encoder's own); or, with
    `text_length` > 0, the rows' precomputed caption features (TEXT_COLUMNS) padded to it."""

    READS = ("id", "caption", "bucket", "fps", "latent", "latent_shape")

    def __init__(self, tokenizer: Tokenizer | None, text_length: int = 0):
        self.tokenizer, self.text_length = tokenizer, text_length

    def __call__(self, table: pa.Table, step: int = -1, slot_base: int = 0) -> StepBatch:
        require_columns(table, self.READS, "collate")
        if table.num_rows == 0:
            raise ValueError("collate: empty batch")
        x = torch.from_numpy(_latents(table, _one_shape(table)))  # (B, C, T, H, W)
        fps = table.column("fps").to_pylist()
        if None in fps:
            raise ValueError(f"collate: null fps for id(s) {_ids(table, [f is None for f in fps])}")
        names, n = table.column_names, table.num_rows
        text = None
        if self.text_length:
            require_columns(table, TEXT_COLUMNS, "collate")
            text, text_mask = _features(table, self.text_length)
            text_ids = torch.zeros(n, 0, dtype=torch.long)
        else:
            text_ids, text_mask = self.tokenizer(
                [c or "" for c in table.column("caption").to_pylist()])
        return StepBatch(
            step=int(table.column("step")[0].as_py()) if "step" in names else step,
            bucket=table.column("bucket")[0].as_py(), ids=table.column("id").to_pylist(), x=x,
            fps=torch.tensor(fps, dtype=torch.float32), text_ids=text_ids, text_mask=text_mask,
            weight=(torch.from_numpy(table.column("weight").to_numpy().copy())
                    if "weight" in names else torch.ones(n)),
            slot=(table.column("slot").to_pylist() if "slot" in names
                  else list(range(slot_base, slot_base + n))), text=text,
        )


def planned_batches(shard, collate: Collate, prefetch: int) -> Callable[[int], Iterator[StepBatch]]:
    """A rank's planned stream (a Ray DataIterator of PlanLoader rows) -> StepBatch per step,
    from the restored step on."""
    def batches(start: int) -> Iterator[StepBatch]:
        blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                    prefetch_batches=prefetch)
        for table in split_steps(blocks):
            step = table.column("step")[0].as_py()
            if step < start:  # a checkpoint committed after this stream was planned
                continue
            if step > start:
                raise RuntimeError(f"data stream is at step {step}, the restored checkpoint "
                                   f"at step {start}")
            start += 1
            yield collate(table)

    return batches


def streamed_batches(shard, collate: Collate, data: TrainDataConfig, rank: int,
                     world_size: int) -> Callable[[int], Iterator[StepBatch]]:
    """A rank's split of the pipelined stream -> single-bucket StepBatches, one pass per call."""
    def batches(start: int) -> Iterator[StepBatch]:
        batcher = StreamBatcher(data, world_size)
        blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                    prefetch_batches=data.prefetch_steps)
        # drain() is lazy: it runs once every block has been pushed
        for table in chain(chain.from_iterable(map(batcher.push, blocks)), batcher.drain()):
            size = batcher.size(table.column("bucket")[0].as_py())
            yield collate(table, slot_base=rank * size)

    return batches
