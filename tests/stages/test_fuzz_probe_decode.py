"""Property-based fuzzing of the probe -> bucket -> decode path , a bounded number
of cases per CI run: a real video (H.264 / mp4, VP9 / WebM, HEVC / Matroska, MPEG-4 / AVI,
AV1 / mp4; each demuxer and decoder has its own ways to fail) with bytes flipped, zeroed, cut
or spliced goes through the stages as the pipeline runs them. Whatever the damage, no
exception escapes a stage, no decode runs past its budget, and every input ends exactly once:
as clips of the bucket's shape, or as one error row with a one-line reason."""

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
from tests.hostile import encode

# name -> (file suffix, how to write it): 2 s at 24 fps, a keyframe every 8 frames
SOURCES = {
    "h264.mp4": lambda p: write_video(p, width=64, height=48, fps=24, num_frames=48, gop=8,
                                      faststart=True),
    "vp9.webm": lambda p: encode(p, "libvpx-vp9", 64, 48, num_frames=48, options={
        "deadline": "realtime", "cpu-used": "8", "g": "8"}),
    "hevc.mkv": lambda p: encode(p, "libx265", 64, 48, num_frames=48, options={
        "x265-params": "log-level=none:keyint=8"}),
    "mpeg4.avi": lambda p: encode(p, "mpeg4", 64, 48, num_frames=48, options={"g": "8"}),
    "av1.mp4": lambda p: encode(p, "libsvtav1", 64, 48, num_frames=48, options={
        "preset": "12", "g": "8"}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz")
    return {name: write(root / name).read_bytes() for name, write in SOURCES.items()}


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


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SOURCES)), edits=damage)
def test_any_damage_ends_as_clips_or_one_error_row(tmp_path_factory, sources, name, edits):
    path = tmp_path_factory.mktemp("case") / f"video.{name.split('.')[1]}"
    path.write_bytes(damaged(sources[name], edits))
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


def test_every_fuzz_source_probes_and_decodes_undamaged(tmp_path, sources):
    """The fuzz starts from files the stages read whole (else it only fuzzes error paths)."""
    for name, data in sources.items():
        path = tmp_path / f"{name.replace('.', '_')}.{name.split('.')[1]}"
        path.write_bytes(data)
        probe = ProbeStage()
        probed = probe(pa.table({"path": [str(path)]})).to_pylist()
        assert len(probed) == 1 and not probe.errors.rows, (name, probe.errors.rows)
        p = probed[0]
        assert (p["width"], p["height"]) == (64, 48), name
        assert abs(p["duration"] - 2.0) < 0.1, (name, p["duration"])
