"""The hostile-video corpus (tests/hostile.py, built fresh here) through probe -> bucket ->
decode as the pipeline runs them: every supported codec / container / pixel format / layout
comes out at its bucket's size and the right way up (the red marker of every frame in the
top-left corner, under all eight display-matrix layouts, mirrors included); everything else
is exactly one error row from the stage the corpus names, with a one-line reason."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.assign import AssignStage
from actors.common.tensors import unpack
from actors.decode import DecodeBudget, DecodeStage
from actors.probe import ProbeStage
from pipeline.config import load_config
from pipeline.streams import PreprocessConfig
from tests.hostile import build_corpus

CASES = ("claims_zero.mp4 vp9.webm hevc.mkv hevc.mov av1.mp4 mpeg4.avi mpeg4.mov ffv1.mkv "
         "vp9_in.mp4 "
         "hevc.mp4 av1.mkv av1.webm mpeg4.mp4 mpeg4.mkv ffv1.avi "
         "h264_10bit.mkv h264_444.mp4 ffv1_444_10bit.mkv hevc_10bit.mkv interlaced.mp4 "
         "rotated90.mp4 rotated180.mov rotated270.mp4 mirrored.mp4 flipped_upside_down.mov "
         "transposed.mp4 transverse.mov vfr.mkv odd_99x67.mkv webm_named.mp4 long_stream.mp4 "
         "tiny_1x1.mkv tiny_2x2.mkv odd_17x9.mkv one_frame.mp4 claims_long.mp4 "
         "claims_huge.avi sps_claims_huge.mp4 sps_claims_wide.mp4 sps_claims_impossible.mp4 "
         "sps_grows_midstream.mkv hevc_sps_claims_huge.mp4 "
         "truncated.mp4 flipped.mp4 empty_stream.mkv text.webm loop_a.mp4 "
         "loop_b.mp4 dangling.mp4 fifo.mp4").split()
RED = np.array([255.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def buckets():
    return load_config(PreprocessConfig, "configs/preprocess/default.yaml", []).buckets


def test_the_corpus_is_what_the_tests_walk(corpus):
    assert sorted(corpus) == sorted(CASES)


def corner_distances(clip: np.ndarray) -> dict[str, float]:
    """Per corner (2x2 px), the largest distance over frames of its colour from pure red."""
    f = clip.astype(np.float64)
    corners = {"tl": f[:, :2, :2], "tr": f[:, :2, -2:], "bl": f[:, -2:, :2],
               "br": f[:, -2:, -2:]}
    return {k: float(np.abs(v.reshape(len(f), -1, 3).mean(1) - RED).max(1).max())
            for k, v in corners.items()}


@pytest.mark.parametrize("name", CASES)
def test_each_hostile_input_is_processed_right_or_one_error_row(corpus, buckets, name):
    case = corpus[name]
    probe = ProbeStage()
    probed = probe(pa.table({"path": [str(case.path)]}))
    outcome, errors = "probe", probe.errors.rows
    if not errors:
        assign = AssignStage(buckets)
        planned = assign(probed)
        outcome, errors = "bucket", assign.errors.rows
    if not errors:
        decode = DecodeStage(threads=1, budget=DecodeBudget(seconds=30, frames=20000,
                                                                   pixels=8192 * 8192))
        clips = decode(planned)
        outcome, errors = ("decode", decode.errors.rows) if decode.errors.rows else ("clip", [])
        assert clips.num_rows + len(decode.errors.rows) == planned.num_rows
    # one row per input at probe / bucket; at decode one per failed clip of the input (its
    # bytes differ per build: the mp4 muxer stamps the file, so where flips land varies)
    assert len(errors) <= (planned.num_rows if outcome == "decode" else 1), errors
    assert all("\n" not in e["error"] and e["path"] == str(case.path) for e in errors), errors
    if case.expect == "any":
        return
    assert outcome == case.expect, (case.why, errors)
    if outcome != "clip":
        assert errors[0]["path"] == str(case.path)
        return
    for frames, row in zip(unpack(clips, "frames", np.uint8), clips.to_pylist(), strict=True):
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3)
        d = corner_distances(frames)
        assert d["tl"] < 30 and min(d["tr"], d["bl"], d["br"]) > 50, (case.why, d)
    shown = probed.to_pylist()[0]
    assert (shown["width"] > shown["height"]) == (clips["width"][0].as_py() >
                                                  clips["height"][0].as_py())


def test_a_probe_over_its_time_budget_is_an_error_row(corpus):
    # FFmpeg's interrupt callback ends the open once `probe_seconds` is spent; a budget no
    # open can meet shows the mechanism (a stalled mount would hit the default 30 s)
    stage = ProbeStage(seconds=1e-9)
    out = stage(pa.table({"path": [str(corpus["hevc.mkv"].path)]}))
    assert out.num_rows == 0
    assert "probe_seconds" in stage.errors.rows[0]["error"]


def test_the_sps_rewrite_keeps_every_other_field(tmp_path):
    """patch_sps_size rewrites the SPS bit by bit (exp-Golomb sizes, emulation bytes, the box
    sizes up to moov): to 8000x16 FFmpeg decodes 8000x16 pictures, and back to 96x64 the file
    is byte for byte the encoded one, for H.264 and HEVC. So the *sps_claims_* cases differ
    from a good file only in the size they claim."""
    import av

    from tests.hostile import encode, patch_sps_size

    for codec, options in (("libx264", {}), ("libx265", {"x265-params": "log-level=none"})):
        good = encode(tmp_path / "good.mp4", codec, options=options)
        wide = tmp_path / "wide.mp4"
        wide.write_bytes(good.read_bytes())
        patch_sps_size(wide, 8000, 16)
        with av.open(str(wide)) as c:
            shapes = {f.to_ndarray(format="rgb24").shape for f in c.decode(video=0)}
        assert shapes == {(16, 8000, 3)}, (codec, shapes)  # FFmpeg takes the SPS's size
        assert wide.read_bytes() != good.read_bytes()
        assert patch_sps_size(wide, 96, 64).read_bytes() == good.read_bytes(), codec
