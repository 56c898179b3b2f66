"""`tubelet eval`'s metrics on videos built with a known defect: each metric finds exactly
the defect it names (and the others stay quiet)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.common.video import write_mp4
from actors.video_eval import VideoEvalStage, evaluate
from models.video_metrics import box_iou, track_object, vbench_flicker
from pipeline.eval import aggregate, parse_prompt, shape_references
from pipeline.synth import COLORS, DIRECTIONS, PLAIN_BACKGROUNDS, shape_mask

T, H, W = 16, 96, 128


def clip(color="red", shape="circle", direction="right", size=30, speed=3.0,
         shade=None, sizes=None, missing=()) -> np.ndarray:
    """A shape on the dark background; `shade[t]` scales its colour, `sizes[t]` its size,
    frames in `missing` have no shape."""
    frames = np.empty((T, H, W, 3), np.uint8)
    frames[:] = PLAIN_BACKGROUNDS["dark"]
    dx, dy = DIRECTIONS[direction]
    for t in range(T):
        if t in missing:
            continue
        s = sizes[t] if sizes is not None else size
        x0 = int(round(W / 2 - s / 2 + dx * speed * (t - T / 2)))
        y0 = int(round(H / 2 - s / 2 + dy * speed * (t - T / 2)))
        rgb = np.asarray(COLORS[color], float) * (shade[t] if shade is not None else 1.0)
        frames[t, y0:y0 + s, x0:x0 + s][shape_mask(shape, s)] = rgb.astype(np.uint8)
    return frames


def measure(frames: np.ndarray) -> dict:
    return evaluate(frames, COLORS, shape_references(), DIRECTIONS)


def test_a_clean_clip_is_steady_and_recognised():
    m = measure(clip())
    assert (m["detected_color"], m["detected_shape"], m["detected_direction"]) == (
        "red", "circle", "right")
    assert m["vanish"] == 0 and m["color_flicker"] < 1.0 and m["area_cv"] < 0.02
    assert m["morph"] < 0.05 and m["jerk"] < 0.5 and m["vbench_flicker"] > 0.97


def test_colour_flicker_is_found_and_nothing_else():
    shade = np.where(np.arange(T) % 2, 0.72, 1.0)
    m, clean = measure(clip(shade=shade)), measure(clip())
    assert m["color_flicker"] > 30 * max(clean["color_flicker"], 1.0)
    assert m["hist_flicker"] > clean["hist_flicker"]
    assert m["vbench_flicker"] < clean["vbench_flicker"]
    assert m["vanish"] == 0 and m["area_cv"] < 0.02 and m["detected_color"] == "red"


def test_shape_morphing_is_found_and_nothing_else():
    sizes = [20 + 14 * (t % 2) for t in range(T)]
    m = measure(clip(sizes=sizes))
    assert m["area_cv"] > 0.3 and m["morph"] > 0.3
    assert m["vanish"] == 0 and m["color_flicker"] < 1.0


def test_vanishing_is_the_fraction_of_frames_without_the_object():
    m = measure(clip(missing={5, 6, 7, 8}))
    assert m["vanish"] == pytest.approx(4 / T)
    assert m["color_flicker"] < 1.0 and m["area_cv"] < 0.02
    assert measure(np.full((T, H, W, 3), 22, np.uint8))["vanish"] == 1.0


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "star"])
def test_every_synthetic_shape_is_recognised(shape):
    assert measure(clip(shape=shape, size=36))["detected_shape"] == shape


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_every_direction_is_recognised(direction):
    assert measure(clip(direction=direction, size=24, speed=2.0))["detected_direction"] == \
        direction


def test_jerky_motion_scores_worse_than_constant_velocity():
    jerky = clip()
    rng = np.random.default_rng(0)
    for t in range(T):  # shake every frame by up to 6 px
        jerky[t] = np.roll(clip()[t], int(rng.integers(-6, 7)), axis=1)
    assert measure(jerky)["jerk"] > 5 * max(measure(clip())["jerk"], 0.1)


def test_prompts_parse_and_adherence_counts_only_what_was_asked(tmp_path):
    assert parse_prompt("a red circle moving up-left on a dark background") == {
        "color": "red", "shape": "circle", "direction": "up-left"}
    assert parse_prompt("a cat") == {"color": None, "shape": None, "direction": None}
    paths = {}
    for name, frames in {"ok": clip(), "blue": clip(color="blue"),
                         "left": clip(direction="left")}.items():
        paths[name] = str(write_mp4(tmp_path / f"{name}.mp4", iter(frames), 8))
    rows = [{"path": paths[n], "set": "generated", "prompt": "", **parse_prompt(
        "a red circle moving right")} for n in ("ok", "blue", "left")]
    rows.append({"path": str(tmp_path / "missing.mp4"), "set": "generated", "prompt": "",
                 "color": None, "shape": None, "direction": None})
    stage = VideoEvalStage(COLORS, shape_references(), DIRECTIONS)
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert [r["path"] for r in out] == [paths["ok"], paths["blue"], paths["left"]]
    assert [(r["color_ok"], r["direction_ok"]) for r in out] == [
        (True, True), (False, True), (True, False)]
    assert len(stage.errors.rows) == 1 and "missing.mp4" in stage.errors.rows[0]["path"]
    agg = aggregate(out)
    assert agg["color_adherence"] == pytest.approx(2 / 3)
    assert agg["direction_adherence"] == pytest.approx(2 / 3)
    assert agg["vanish"] == 0.0


def test_a_tracked_box_matches_the_drawn_box_and_iou_is_exact():
    frames = clip(size=30)
    track = track_object(frames, COLORS, color="red")
    x0 = int(round(W / 2 - 15 + 3.0 * (0 - T / 2)))
    assert box_iou(track.box[0], np.array([x0, H // 2 - 15, x0 + 30, H // 2 + 15])) > 0.9
    assert box_iou(np.array([0, 0, 10, 10]), np.array([5, 0, 15, 10])) == pytest.approx(1 / 3)
    assert vbench_flicker(np.zeros((3, 4, 4, 3), np.uint8)) == 1.0


def test_videos_are_read_at_the_requested_rate(tmp_path):
    from actors.video_eval import read_frames

    frames = clip()
    path = write_mp4(tmp_path / "v.mp4", iter(frames), 24)  # 16 frames at 24 fps: 0.67 s
    assert read_frames(str(path)).shape == (16, H, W, 3)
    sub = read_frames(str(path), fps=8)  # t = 0, 1/8, ..., 5/8 -> frames 0, 3, 6, ..., 15
    assert sub.shape[0] == 6
    assert np.abs(sub[1].astype(int) - read_frames(str(path))[3]).mean() < 1.0
    assert read_frames(str(path), max_frames=4, fps=8).shape[0] == 4
