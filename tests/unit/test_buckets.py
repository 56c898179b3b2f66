"""Bucket table and assignment rule (property tests: deterministic, covered, 4k+1, multiples)."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.common.buckets import BucketConfig, BucketTable, Resolution
from pipeline.config import ConfigError, from_dict

CFG = BucketConfig(
    target_fps=8,
    resolutions=[Resolution("64px", 4096, {9: 4, 17: 2}),
                 Resolution("128px", 16384, {9: 4, 17: 2, 33: 1})],
    max_clips_per_video=3,
)
TABLE = BucketTable(CFG)


def test_table_shapes_are_multiples_and_near_budget():
    assert len(TABLE.buckets) == 2 * 6 * 2 + 6  # (64px: 2 counts, 128px: 3) x 6 ratios
    for b in TABLE.buckets.values():
        assert b.height % 16 == 0 and b.width % 16 == 0
        assert (b.num_frames - 1) % 4 == 0
        budget = {"64px": 4096, "128px": 16384}[b.resolution]
        assert 0.75 < b.height * b.width / budget < 1.3
        w, h = (float(x) for x in b.aspect_ratio.split(":"))
        assert abs(math.log(b.width / b.height) - math.log(w / h)) < 0.25


@settings(max_examples=300, deadline=None)
@given(width=st.integers(16, 2000), height=st.integers(16, 2000),
       duration=st.floats(0.0, 20.0))
def test_assignment_rule(width, height, duration):
    clips, reason = TABLE.assign("v.mp4", width, height, duration)
    again = TABLE.assign("v.mp4", width, height, duration)
    assert (clips, reason) == again  # deterministic
    if reason is not None:
        assert clips == [] and reason.startswith(("too small", "too short"))
        return
    b = clips[0].bucket
    assert b.width <= width and b.height <= height  # the clip covers its bucket
    assert b.aspect_ratio == TABLE.nearest_ratio(width, height)
    # largest resolution that fits
    bigger = [r for r in TABLE.resolutions if r.pixels > TABLE.cfg.resolutions[0].pixels
              and r.name != b.resolution]
    for r in bigger:
        if r.pixels > {"64px": 4096, "128px": 16384}[b.resolution]:
            h, w = TABLE.shape(r, b.aspect_ratio)
            assert h > height or w > width
    # largest frame count that fits the duration, every clip inside the video
    assert TABLE.frames_available(duration) >= b.num_frames
    for c in clips:
        assert c.start + (b.num_frames - 1) / 8 < duration + 1e-9
    assert len({c.id for c in clips}) == len(clips) <= 3


def test_too_small_and_too_short_are_reasons():
    assert TABLE.assign("a", 40, 40, 5.0)[1].startswith("too small: 40x40")
    assert TABLE.assign("a", 640, 360, 0.5)[1].startswith("too short: 0.50s gives 4 frames")


def test_long_video_gives_back_to_back_clips():
    clips, _ = TABLE.assign("long.mp4", 640, 360, 20.0)
    assert [c.start for c in clips] == [0.0, 33 / 8, 66 / 8]
    assert clips[0].bucket.name == "128px-16:9-33f"


@pytest.mark.parametrize("data, needle", [
    ({"resolutions": [{"name": "a", "pixels": 4096, "batch_sizes": {8: 2}}]}, "must be 4k + 1"),
    ({"aspect_ratios": ["16x9"]}, "expected 'W:H'"),
    ({"target_fps": 0}, "target_fps: must be > 0"),
])
def test_impossible_buckets_are_config_errors(data, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        from_dict(BucketConfig, data, where="b.yaml")
