"""The bucket stage (actors/assign.py), called on a table without Ray."""

from __future__ import annotations

import pyarrow as pa

from actors.assign import CLIP_SCHEMA, AssignStage
from actors.common.buckets import BucketConfig, Resolution

CFG = BucketConfig(
    target_fps=8,
    resolutions=[Resolution("64px", 4096, {9: 4, 17: 2}),
                 Resolution("128px", 16384, {9: 4, 17: 2, 33: 1})],
    max_clips_per_video=3,
)


def probed(**columns) -> pa.Table:
    base = {"path": ["ok.mp4", "tiny.mp4"], "caption": ["x", "y"], "width": [640, 20],
            "height": [360, 20], "fps": [30.0, 30.0], "duration": [9.0, 9.0],
            "rotation": [0, 0]}
    return pa.table({**base, **columns})


def test_assign_stage_skips_and_resumes():
    batch = probed()
    out = AssignStage(CFG)(batch)
    assert out.column("path").to_pylist() == ["ok.mp4", "ok.mp4"]
    stage = AssignStage(CFG, done_ids={out.column("id")[0].as_py()})
    again = stage(batch)
    assert again.num_rows == 1 and stage.already_done == 1
    assert [r["kind"] for r in stage.errors.rows] == ["skip"]
    assert "tiny.mp4" == stage.errors.rows[0]["path"]


def test_clip_rows_follow_the_schema_and_fit_their_bucket():
    out = AssignStage(CFG)(probed())
    assert out.schema.equals(CLIP_SCHEMA)
    for row in out.to_pylist():
        assert row["height"] % 16 == 0 and row["width"] % 16 == 0
        assert (row["num_frames"] - 1) % 4 == 0
        assert row["fps"] == 8 and row["src_fps"] == 30.0 and row["caption"] == "x"
        assert row["height"] * row["width"] <= 16384 * 1.1  # never above the pixel budget


def test_missing_caption_column_gives_empty_captions():
    out = AssignStage(CFG)(probed().drop_columns(["caption"]))
    assert out.num_rows == 2 and set(out.column("caption").to_pylist()) == {""}
