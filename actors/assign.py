"""Bucket assignment stage: one probed video in, its clips (one row each) out.

Reads the probe columns, writes the clip plan that the decode stage follows. Videos that no
bucket fits become "skip" rows in the errors table with the reason. Clips whose id is in
`done_ids` (already in the latent dataset) are dropped here, which is how a rerun resumes.
Resources: pure Python; the `assign` entry of the job config (a fraction of a CPU).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from actors.common.buckets import BucketConfig, BucketTable
from actors.common.errors import ErrorSink
from actors.common.schema import require_columns
from actors.common.stage import StageSpec

CLIP_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("path", pa.string()),
    ("caption", pa.string()),
    ("bucket", pa.string()),
    ("start", pa.float64()),
    ("fps", pa.float64()),  # target fps of the clip
    ("num_frames", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("rotation", pa.int32()),
    ("src_fps", pa.float64()),
    ("src_width", pa.int32()),
    ("src_height", pa.int32()),
])


class AssignStage:
    READS = ("path", "width", "height", "fps", "duration", "rotation")  # + optional caption
    WRITES = tuple(CLIP_SCHEMA.names)

    @classmethod
    def spec(cls, cfg: Any, errors_dir: str | None,
             done_ids: frozenset[str] | set[str] = frozenset()) -> StageSpec:
        """From a clip config (`ClipConfig`): its `buckets` and its `assign` pool; clips in
        `done_ids` (written by an earlier run) are left out."""
        return StageSpec("assign", cls, dict(buckets=cfg.buckets, errors_dir=errors_dir,
                                             done_ids=frozenset(done_ids)), cfg.assign)

    def __init__(self, buckets: BucketConfig, errors_dir: str | None = None,
                 done_ids: frozenset[str] | set[str] = frozenset()):
        self.table = BucketTable(buckets)
        self.done_ids = done_ids
        self.errors = ErrorSink(errors_dir, "bucket")
        self.already_done = 0  # clips dropped because they were written by an earlier run

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, self.READS, "bucket")
        if "caption" not in batch.column_names:
            batch = batch.append_column("caption", pa.nulls(batch.num_rows, pa.string()))
        rows = []
        for video in batch.select(("caption", *self.READS)).to_pylist():
            rows.extend(self.clips(video))
        self.errors.flush()
        return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)

    def clips(self, video: dict) -> list[dict]:
        plans, reason = self.table.assign(
            video["path"], video["width"], video["height"], video["duration"])
        if reason is not None:
            self.errors.add(video["path"], f"{reason}; not used (change the bucket table "
                            "in the preprocess config to include it)", kind="skip")
        rows = []
        for plan in plans:
            if plan.id in self.done_ids:
                self.already_done += 1
                continue
            b = plan.bucket
            rows.append({
                "id": plan.id, "path": video["path"], "caption": video["caption"] or "",
                "bucket": b.name, "start": plan.start, "fps": self.table.cfg.target_fps,
                "num_frames": b.num_frames, "height": b.height, "width": b.width,
                "rotation": video["rotation"], "src_fps": video["fps"],
                "src_width": video["width"], "src_height": video["height"],
            })
        return rows
