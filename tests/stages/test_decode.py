"""decode_clip / DecodeStage: clips have the bucket's shape, the right source frames (checked
against the synthetic ground truth and a decode-everything reference), seek to the keyframe
before the start, stop decoding at the clip's end, and broken inputs become error rows."""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pytest

from actors.common.buckets import BucketConfig, BucketTable
from actors.common.tensors import unpack
from actors.decode import ClipError, DecodeBudget, DecodeStage, _Resizer, decode_clip
from actors.probe import ProbeStage
from pipeline.synth import COLORS, shape_mask
from tests.badfiles import BAD_INPUT_STAGE, write_video


def plan_rows(root, rows, target_fps: float = 8.0) -> list[dict]:
    """The bucket stage's clip plan for dataset rows (one clip each, from the real rule)."""
    table = BucketTable(BucketConfig(target_fps=target_fps))
    plans = []
    for r in rows:
        path = str(root / r["path"])
        clips, reason = table.assign(path, r["width"], r["height"], r["num_frames"] / r["fps"])
        assert reason is None, reason
        c = clips[0]
        plans.append({"id": c.id, "path": path, "bucket": c.bucket.name, "start": c.start,
                      "fps": target_fps, "num_frames": c.bucket.num_frames,
                      "height": c.bucket.height, "width": c.bucket.width, "rotation": 0,
                      "caption": r["caption"]})
    return plans


def reference_frames(path, height: int, width: int) -> list[np.ndarray]:
    """Every frame, decoded front to back with no seek, scaled and cropped like a clip."""
    resize = _Resizer(height, width, 0)
    with av.open(str(path)) as container:
        return [resize(f) for f in container.decode(container.streams.video[0])]


def test_clips_have_the_bucket_shape_for_every_aspect_ratio(dataset):
    root, rows = dataset
    plans = plan_rows(root, rows)
    assert len({(p["height"], p["width"]) for p in plans}) >= 5  # 5+ distinct bucket shapes
    stage = DecodeStage(threads=1)
    out = stage(pa.Table.from_pylist(plans))
    assert stage.errors.rows == []
    assert out.column("id").to_pylist() == [p["id"] for p in plans]
    assert out.column("caption").to_pylist() == [p["caption"] for p in plans]  # passes through
    assert out.schema.field("frames").type == pa.large_binary()
    assert out.schema.field("frames_shape").type == pa.list_(pa.int32())
    assert out.schema.field("decode_seconds").type == pa.float64()
    assert all(s > 0 for s in out.column("decode_seconds").to_pylist())
    for clip, p in zip(unpack(out, "frames", np.uint8), plans, strict=True):
        assert clip.shape == (p["num_frames"], p["height"], p["width"], 3)
        assert clip.std() > 5  # real pictures, not a blank buffer


def _shape_box(truth: dict, i: int) -> tuple[int, int, int, int]:
    """Exact pixel box [x0, y0, x1, y1) of the shape in source frame i (its mask's extent,
    which is tighter than the ground-truth square for a triangle, square or star)."""
    mask = shape_mask(truth["shape"], truth["shape_size"])
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    bx, by = truth["bboxes"][i][:2]
    return bx + xs[0], by + ys[0], bx + xs[-1] + 1, by + ys[-1] + 1


def test_resampling_picks_the_nearest_previous_source_frame(dataset):
    """Target frame k at 10 fps shows source frame floor(k * src_fps / 10): its shape sits
    where the ground truth puts it after the same scale and crop, and it equals that frame
    of a front-to-back reference decode exactly."""
    root, rows = dataset
    fps = 10.0
    for plan, truth in zip(plan_rows(root, rows, target_fps=fps), rows, strict=True):
        T, H, W = plan["num_frames"], plan["height"], plan["width"]
        clip = decode_clip(plan["path"], 0.0, fps, T, H, W, threads=1)
        ref = reference_frames(plan["path"], H, W)
        src = [math.floor(k * truth["fps"] / fps + 1e-9) for k in range(T)]
        for k in range(T):
            np.testing.assert_array_equal(clip[k], ref[src[k]])

        # geometry from the ground truth, independent of the decoder's own resize code
        s = max(W / truth["width"], H / truth["height"])
        cx = (round(truth["width"] * s) - W) // 2
        cy = (round(truth["height"] * s) - H) // 2
        color = np.asarray(COLORS[truth["color"]], np.int16)
        for k in range(T):
            x0, y0, x1, y1 = _shape_box(truth, src[k])
            want = (np.clip(x0 * s - cx, 0, W), np.clip(y0 * s - cy, 0, H),
                    np.clip(x1 * s - cx, 0, W), np.clip(y1 * s - cy, 0, H))
            if want[2] - want[0] < 4 or want[3] - want[1] < 4:
                continue  # the shape is (mostly) cropped away
            hit = np.abs(clip[k].astype(np.int16) - color).max(-1) <= 60
            ys, xs = np.nonzero(hit)
            got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.allclose(got, want, atol=2.5), (truth["path"], k, got, want)


def test_clip_after_a_keyframe_equals_the_reference_and_seeks(gop_video):
    # 30 fps, keyframes every 10 frames; start 1.55 s (frame 46.5) -> seek to keyframe 40
    start, fps, T = 1.55, 10.0, 5
    stats: dict = {}
    clip = decode_clip(str(gop_video), start, fps, T, 32, 48, threads=1, stats=stats)
    ref = reference_frames(gop_video, 32, 48)
    want = [math.floor((start + k / fps) * 30 + 1e-9) for k in range(T)]  # 46, 49, ..., 58
    assert want == [46, 49, 52, 55, 58]
    np.testing.assert_array_equal(clip, np.stack([ref[i] for i in want]))
    # decoded from keyframe 40 through frame 59 (the first past the last target, 1.95 s)
    assert stats == {"decoded": 20, "converted": 5, "restarts": 0}


def test_millisecond_timestamps_still_pick_the_right_frame(tmp_path):
    # mkv stores times in whole ms: frame 5 of 30 fps is at 167 ms, after the 12 fps target
    # 5/12 s = 166.67 ms it belongs to; the comparison allows one time-base tick of slack
    path = write_video(tmp_path / "ms.mkv", width=64, height=48, fps=30, num_frames=45)
    with av.open(str(path)) as container:
        assert container.streams.video[0].time_base == Fraction(1, 1000)
    clip = decode_clip(str(path), 0.0, 12.0, 17, 48, 64, threads=1)
    ref = reference_frames(path, 48, 64)
    want = [math.floor(k * 30 / 12 + 1e-9) for k in range(17)]
    np.testing.assert_array_equal(clip, np.stack([ref[i] for i in want]))


def test_decoding_stops_at_the_end_of_the_clip(gop_video):
    stats: dict = {}
    decode_clip(str(gop_video), 0.0, 10.0, 5, 32, 48, threads=1, stats=stats)
    assert stats["decoded"] == 13  # frames 0..12 of 90; frame 12 is at the last target, 0.4 s
    decode_clip(str(gop_video), 0.0, 10.0, 30, 32, 48, threads=1, stats=stats)
    assert stats["decoded"] == 88  # targets up to 2.9 s = frame 87; frame 87 ends it


def test_slower_source_repeats_frames(gop_video):
    stats: dict = {}
    clip = decode_clip(str(gop_video), 0.0, 60.0, 8, 32, 48, threads=1, stats=stats)
    for k in range(0, 8, 2):  # 30 fps source at 60 fps: every frame twice
        np.testing.assert_array_equal(clip[k], clip[k + 1])
    assert stats["converted"] == 4


def test_rotation_turns_the_picture_counter_clockwise(tmp_path):
    # coded 64x48 with a red marker top-left; a display rotation of 90 degrees
    # counter-clockwise shows it 48 wide, 64 high, with the marker bottom-left
    path = write_video(tmp_path / "rot90.mp4", width=64, height=48, num_frames=4, rotation=90)
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).rotation == 90  # FFmpeg's own reading
    clip = decode_clip(str(path), 0.0, 30.0, 2, 64, 48, rotation=90, threads=1)
    assert clip.shape == (2, 64, 48, 3)
    red = (clip[0, ..., 0] > 200) & (clip[0, ..., 1] < 60) & (clip[0, ..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert ys.min() > 48 and xs.max() < 12, (ys.min(), xs.max())


def test_non_square_pixels_are_stretched_to_the_shown_shape(tmp_path):
    # coded 64x128 with SAR 2:1 is shown 128x128; its 8x8 red marker is shown 16 wide, 8 high.
    # Read as square pixels it would be 64x128, scaled to 128x256 and cropped to rows 64-192,
    # and the marker would be cut away.
    path = write_video(tmp_path / "sar.mp4", width=64, height=128, num_frames=2,
                       sar=Fraction(2, 1))
    clip = decode_clip(str(path), 0.0, 30.0, 1, 128, 128, threads=1)
    red = (clip[0, ..., 0] > 200) & (clip[0, ..., 1] < 60) & (clip[0, ..., 2] < 60)
    ys, xs = np.nonzero(red)
    assert len(ys) and 5 <= ys.max() <= 8 and 12 <= xs.max() <= 16, (ys.max(), xs.max())


def test_a_clip_past_the_end_raises_instead_of_padding(gop_video):
    with pytest.raises(ClipError, match=r"the video ends at 3.00s but the clip needs frames up"):
        decode_clip(str(gop_video), 2.0, 10.0, 17, 32, 48, threads=1)


@pytest.mark.parametrize("threads", [1, 0])  # frame threading reports truncation differently
def test_broken_inputs_are_error_rows_and_good_rows_go_on(threads, dataset, bad_files):
    """Damage the probe cannot see (tests/badfiles.py): probe -> bucket rule -> decode, as the
    pipeline runs them, turns each into one decode error row; the good clips come out."""
    root, rows = dataset
    good = plan_rows(root, rows[:2])
    kinds = sorted(k for k, s in BAD_INPUT_STAGE.items() if s == "decode")
    probed = ProbeStage()(pa.table({"path": [str(bad_files[k]) for k in kinds]})).to_pylist()
    assert len(probed) == len(kinds)  # their headers are fine
    table = BucketTable(BucketConfig(target_fps=8.0))
    bad = []
    for kind, p in zip(kinds, probed, strict=True):
        clips, reason = table.assign(p["path"], p["width"], p["height"], p["duration"])
        assert reason is None, (kind, reason)  # a clip is planned: decode must catch it
        c = clips[0]
        bad.append({**good[0], "id": c.id, "path": p["path"], "start": c.start,
                    "num_frames": c.bucket.num_frames, "height": c.bucket.height,
                    "width": c.bucket.width})
    kinds.append("missing")  # e.g. deleted between probe and decode
    bad.append({**good[0], "id": "gone", "path": str(bad_files["missing"])})
    stage = DecodeStage(threads=threads)
    out = stage(pa.Table.from_pylist([bad[0], good[0], bad[1], good[1], bad[2]]))
    assert out.column("id").to_pylist() == [good[0]["id"], good[1]["id"]]
    assert out.column("decode_node").to_pylist() == ["local", "local"]
    for clip, p in zip(unpack(out, "frames", np.uint8), good, strict=True):
        assert clip.shape == (p["num_frames"], p["height"], p["width"], 3)
    errors = {r["path"]: r for r in stage.errors.rows}
    assert set(errors) == {b["path"] for b in bad}
    for kind, b in zip(kinds, bad, strict=True):
        msg = errors[b["path"]]["error"]
        assert errors[b["path"]]["stage"] == "decode" and "\n" not in msg
        assert msg.endswith("remove it from the input or fix the file"), msg
        if kind == "missing":
            assert msg.startswith("cannot open the video"), msg
        else:  # truncated or zeroed data: FFmpeg's error, or the frames run out
            assert ("decoding failed after" in msg or "the video ends at" in msg), msg


def test_stage_needs_the_clip_plan_columns():
    with pytest.raises(ValueError, match=r"lack column\(s\) \['start'"):
        DecodeStage()(pa.table({"id": ["a"], "path": ["x.mp4"]}))


def test_a_clip_over_its_decode_budget_is_an_error_row(gop_video):
    """Issue 13: a stream that decodes far more frames (or seconds) than its clip needs is
    stopped by the budget and becomes an error row; a clip within budget decodes exactly."""
    within = decode_clip(str(gop_video), 0.0, 10.0, 5, 32, 48, threads=1,
                         budget=DecodeBudget(seconds=60, frames=13))
    assert within.shape == (5, 32, 48, 3)  # 13 decoded frames (the test above) is in budget
    with pytest.raises(ClipError, match=r"more than 12 frames .*decode_budget\.frames"):
        decode_clip(str(gop_video), 0.0, 10.0, 5, 32, 48, threads=1,
                    budget=DecodeBudget(frames=12))
    with pytest.raises(ClipError, match=r"decode_budget\.seconds"):
        decode_clip(str(gop_video), 0.0, 10.0, 30, 32, 48, threads=1,
                    budget=DecodeBudget(seconds=1e-9))
    row = {"id": "c", "path": str(gop_video), "start": 0.0, "fps": 10.0, "num_frames": 30,
           "height": 32, "width": 48, "rotation": 0}
    stage = DecodeStage(threads=1, budget=DecodeBudget(frames=50))
    out = stage(pa.Table.from_pylist([row, {**row, "id": "short", "num_frames": 5}]))
    assert out.column("id").to_pylist() == ["short"]
    (error,) = stage.errors.rows
    assert error["path"] == str(gop_video) and "decode_budget.frames" in error["error"]


def test_the_pixel_budget_reaches_the_decoder(gop_video):
    """decode_budget.pixels is the decoder's own limit: a picture over it is an error naming
    the key (the 96x64 stream under a 96*64-1 budget), one well within it decodes (FFmpeg
    counts the picture with its width rounded up to its alignment: 128x64 here), and a budget
    past FFmpeg's int (which would make FFmpeg refuse the option itself) means FFmpeg's limit."""
    args = (str(gop_video), 0.0, 10.0, 5, 32, 48)
    with pytest.raises(ClipError, match=r"decode_budget\.pixels=6143"):
        decode_clip(*args, threads=1, budget=DecodeBudget(pixels=96 * 64 - 1))
    for pixels in (128 * 64, 10**10):
        assert decode_clip(*args, threads=1, budget=DecodeBudget(pixels=pixels)).shape == \
            (5, 32, 48, 3)
