"""`tubelet synth` writes real, decodable, captioned videos, deterministic for a seed."""

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.synth import COLORS, SynthConfig, synthesize


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rows = synthesize(SynthConfig(num_videos=12, seed=3, workers=2), out)
    return out, rows


def test_twelve_decodable_videos_with_captions(dataset):
    out, rows = dataset
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(list(out.glob("*.mp4"))) == 12
    ratios = set()
    for line in lines:
        row = json.loads(line)
        with av.open(str(out / row["path"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert stream.average_rate == Fraction(row["fps"])
        assert len(frames) == row["num_frames"] == len(row["bboxes"])
        assert frames[0].shape == (row["height"], row["width"], 3)
        ratios.add(round(row["width"] / row["height"], 2))
        assert row["caption"].startswith(("a ", "an "))
        for word in (row["color"], row["shape"], row["direction"]):
            assert word in row["caption"]
    assert len(ratios) >= 3


def test_bounding_boxes_hold_the_named_colour(dataset):
    out, rows = dataset
    for row in rows:
        with av.open(str(out / row["path"])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % 10:
                    continue
                x0, y0, x1, y1 = row["bboxes"][i]
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2  # every shape covers its centre
                patch = frame.to_ndarray(format="rgb24")[cy - 1:cy + 2, cx - 1:cx + 2]
                err = np.abs(patch.reshape(-1, 3).mean(0) - np.asarray(COLORS[row["color"]]))
                assert err.max() < 40, (row["path"], i, err)


def test_motion_follows_the_caption_direction(dataset):
    _, rows = dataset
    for row in rows:
        (x0, y0, *_), (x1, y1, *_) = row["bboxes"][0], row["bboxes"][3]
        if "left" in row["direction"]:
            assert x1 < x0
        if "right" in row["direction"]:
            assert x1 > x0
        if row["direction"].startswith("up"):
            assert y1 < y0
        if row["direction"].startswith("down"):
            assert y1 > y0


def test_without_bounces_every_frame_moves_the_captioned_way(tmp_path):
    """`bounce: false`: no box leaves the frame and no velocity component changes sign, so the
    caption's direction holds in every frame (with bounces, long or fast videos turn back)."""
    rows = synthesize(SynthConfig(num_videos=16, seed=5, workers=1, bounce=False,
                                  min_seconds=2.0, max_seconds=3.0), tmp_path)
    for row in rows:
        boxes = np.asarray(row["bboxes"], float)
        assert boxes[:, :2].min() >= 0
        assert (boxes[:, 2] <= row["width"]).all() and (boxes[:, 3] <= row["height"]).all()
        steps = np.diff(boxes[:, :2], axis=0)  # (T-1, 2) x, y per frame
        for axis, sign in enumerate(np.sign(_direction(row["direction"]))):
            moved = steps[:, axis]
            assert (moved * sign >= 0).all() if sign else (moved == 0).all(), row["path"]
        total = boxes[-1, :2] - boxes[0, :2]
        assert np.hypot(*total) >= 0.5 * (len(boxes) - 1) / row["fps"] * 0.15 * row["width"]


def _direction(name: str) -> tuple[float, float]:
    from pipeline.synth import DIRECTIONS

    return DIRECTIONS[name]


def test_same_seed_same_dataset(tmp_path, dataset):
    _, rows = dataset
    again = synthesize(SynthConfig(num_videos=12, seed=3, workers=1), tmp_path)
    assert again == rows
    other = synthesize(SynthConfig(num_videos=12, seed=4, workers=1), tmp_path / "b")
    assert [r["caption"] for r in other] != [r["caption"] for r in rows]


def test_photo_videos_move_over_natural_photos_from_disjoint_splits(tmp_path):
    from pipeline.photos import HELD_OUT, TRAIN, load_photo

    assert not set(TRAIN) & set(HELD_OUT)
    cfg = SynthConfig(num_videos=3, seed=1, workers=1, kind="photos", photo_split="held-out",
                      max_seconds=1.0)
    rows = synthesize(cfg, tmp_path)
    assert [r["path"] for r in rows] == [f"photo_{i:05d}.mp4" for i in range(3)]
    for row in rows:
        assert row["photo"] in HELD_OUT and row["caption"].startswith("a ")
        with av.open(str(tmp_path / row["path"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3)
        # a photo, not a flat frame: texture everywhere, no black borders from the warp
        assert frames.std() > 20 and frames[:, :2].mean() > 5 and frames[:, -2:].mean() > 5
        # the camera moves: consecutive frames differ, but stay alike (no cuts)
        diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
        assert diffs.max() > 0.5 and diffs.max() < 0.5 * frames.std()
    assert load_photo("camera").shape == (512, 512, 3)  # grey photos come as RGB
    with pytest.raises(ValueError, match="kind"):
        SynthConfig(kind="clouds").validate()
