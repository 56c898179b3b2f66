"""Property-based fuzzing of the probe -> bucket -> decode path (issue 13), a bounded number
of cases per CI run: a real mp4 with bytes flipped, zeroed, cut or spliced goes through the
stages as the pipeline runs them. Whatever the damage, no exception escapes a stage, no
decode runs past its budget, and every input ends exactly once: as clips of the bucket's
shape, or as one error row with a one-line reason."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.common.buckets import BucketConfig, BucketTable
from actors.common.tensors import unpack
from actors.decode import DecodeBudget, DecodeStage
from actors.probe import ProbeStage
from tests.badfiles import write_video


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> bytes:
    path = write_video(tmp_path_factory.mktemp("fuzz") / "src.mp4", width=64, height=48,
                       fps=24, num_frames=48, gop=8, faststart=True)
    return path.read_bytes()


damage = st.lists(st.tuples(st.sampled_from(["flip", "zero", "cut", "splice"]),
                            st.floats(0.0, 1.0), st.integers(1, 4096)),
                  min_size=1, max_size=4)


def damaged(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, n in edits:
        i = int(where * max(len(out) - 1, 0))
        if kind == "flip":
            for j in range(i, min(i + n, len(out)), 97):
                out[j] ^= 0xFF
        elif kind == "zero":
            out[i:i + n] = bytes(len(out[i:i + n]))
        elif kind == "cut":
            del out[i:]
        else:  # splice: a copy of another part of the file lands here
            out[i:i] = out[:n]
    return bytes(out)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=damage)
def test_any_damage_ends_as_clips_or_one_error_row(tmp_path_factory, source, edits):
    path = tmp_path_factory.mktemp("case") / "video.mp4"
    path.write_bytes(damaged(source, edits))
    probe = ProbeStage()
    probed = probe(pa.table({"path": [str(path)]})).to_pylist()
    errors = list(probe.errors.rows)
    assert len(probed) + len(errors) == 1
    if errors:
        assert "\n" not in errors[0]["error"] and errors[0]["path"] == str(path)
        return
    p = probed[0]
    clips, reason = BucketTable(BucketConfig(target_fps=8.0)).assign(
        p["path"], p["width"], p["height"], p["duration"])
    if reason is not None:  # too short / too small: the bucket rule's skip, with a reason
        assert isinstance(reason, str) and reason
        return
    rows = [{"id": c.id, "path": p["path"], "start": c.start, "fps": 8.0,
             "num_frames": c.bucket.num_frames, "height": c.bucket.height,
             "width": c.bucket.width, "rotation": p.get("rotation") or 0} for c in clips]
    stage = DecodeStage(threads=1, budget=DecodeBudget(seconds=20, frames=2000))
    out = stage(pa.Table.from_pylist(rows))
    assert out.num_rows + len(stage.errors.rows) == len(rows)
    for clip, r in zip(unpack(out, "frames", np.uint8), out.to_pylist(), strict=True):
        assert clip.shape == (r["num_frames"], r["height"], r["width"], 3)
    assert all("\n" not in e["error"] for e in stage.errors.rows)
