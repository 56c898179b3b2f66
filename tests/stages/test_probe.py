"""ProbeStage: header facts match the synthetic ground truth; every broken input becomes
exactly one error row with a clear reason, and the good rows around it still come out."""

from __future__ import annotations

from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.probe import ProbeStage
from tests.badfiles import BAD_INPUT_STAGE, write_video

# what the one-line reason must say, per kind of broken input
REASONS = {
    "missing": "file not found",
    "directory": "is a directory",
    "empty": "empty file (0 bytes)",
    "random_bytes": "not a readable video",
    "text": "not a video: the file is text",
    "audio_only": "no video stream (only audio)",
    "truncated": "truncated mp4: no index",
    "huge_dims": "picture too large: the header claims 12000x12000",
    "huge_side": "picture too large: the header claims 20000x64",
    "absurd_dims": "picture too large: the header claims 40000x40000",
}


def test_good_videos_match_ground_truth(dataset):
    root, rows = dataset
    batch = pa.table({"path": [str(root / r["path"]) for r in rows],
                      "caption": [r["caption"] for r in rows]})
    stage = ProbeStage()
    out = stage(batch)
    assert stage.errors.rows == []
    assert out.column_names == ["path", "caption", *ProbeStage.WRITES]
    assert out.column("caption").to_pylist() == batch.column("caption").to_pylist()
    for got, truth in zip(out.to_pylist(), rows, strict=True):
        assert (got["width"], got["height"]) == (truth["width"], truth["height"])
        assert got["fps"] == truth["fps"]
        assert got["num_frames"] == truth["num_frames"]
        assert got["duration"] == pytest.approx(truth["num_frames"] / truth["fps"], abs=1e-3)
        assert (got["rotation"], got["codec"]) == (0, "h264")
    assert out.schema.field("fps").type == pa.float64()
    assert out.schema.field("width").type == pa.int64()


@pytest.mark.parametrize("kind", sorted(k for k, s in BAD_INPUT_STAGE.items() if s == "probe"))
def test_each_broken_input_is_one_error_row(kind, bad_files, dataset):
    root, rows = dataset
    good = [str(root / rows[0]["path"]), str(root / rows[1]["path"])]
    bad = str(bad_files[kind])
    stage = ProbeStage()
    out = stage(pa.table({"path": [good[0], bad, good[1]], "caption": ["a", "b", "c"]}))
    assert out.column("path").to_pylist() == good  # the rest of the batch goes on
    assert out.column("caption").to_pylist() == ["a", "c"]
    assert len(stage.errors.rows) == 1
    row = stage.errors.rows[0]
    assert (row["path"], row["stage"], row["kind"]) == (bad, "probe", "error")
    assert REASONS[kind] in row["error"], row["error"]
    assert "\n" not in row["error"]
    assert "input" in row["error"]  # says what to do: check / remove it from the input


@pytest.mark.parametrize("kind", sorted(k for k, s in BAD_INPUT_STAGE.items() if s == "decode"))
def test_damage_past_the_index_passes_the_probe(kind, bad_files):
    # a truncated mp4 indexed up front, or one with zeroed frame data, has intact headers:
    # the probe cannot tell, so the decode stage must report it (tests/stages/test_decode.py)
    stage = ProbeStage()
    out = stage(pa.table({"path": [str(bad_files[kind])]}))
    assert stage.errors.rows == [] and out.num_rows == 1
    assert out.column("num_frames").to_pylist() == [120]  # what the header claims


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_from_display_matrix_swaps_size(rotation, tmp_path):
    path = write_video(tmp_path / f"rot{rotation}.mp4", width=64, height=32, num_frames=3,
                       rotation=rotation)
    out = ProbeStage()(pa.table({"path": [str(path)]})).to_pylist()[0]
    assert out["rotation"] == rotation
    turned = rotation in (90, 270)
    assert (out["width"], out["height"]) == ((32, 64) if turned else (64, 32))


@pytest.mark.parametrize("rotation", [0, 90])
def test_non_square_pixels_give_the_shown_size(rotation, tmp_path):
    # coded 48x64, each pixel shown twice as wide as high: players show 96x64
    path = write_video(tmp_path / "anamorphic.mp4", width=48, height=64, num_frames=3,
                       rotation=rotation, sar=Fraction(2, 1))
    out = ProbeStage()(pa.table({"path": [str(path)]})).to_pylist()[0]
    assert (out["width"], out["height"]) == ((64, 96) if rotation else (96, 64))


def test_size_limits_are_configurable(dataset):
    root, rows = dataset
    row = rows[0]
    stage = ProbeStage(max_pixels=row["width"] * row["height"] - 1)
    out = stage(pa.table({"path": [str(root / row["path"])]}))
    assert out.num_rows == 0
    assert "picture too large" in stage.errors.rows[0]["error"]


def test_a_pixel_limit_past_ffmpegs_int_still_probes(dataset):
    """max_pixels also goes to FFmpeg's decoder as an int option (pixel_limit clamps it): a
    limit past FFmpeg's int still probes a good file, with no error row."""
    root, rows = dataset
    stage = ProbeStage(max_pixels=10**10)
    assert stage(pa.table({"path": [str(root / rows[0]["path"])]})).num_rows == 1
    assert not stage.errors.rows


def test_a_frame_count_over_the_budget_is_refused_before_decoding(dataset):
    root, rows = dataset
    row = rows[0]
    claimed = round(row["num_frames"])
    stage = ProbeStage(max_frames=claimed - 1)
    assert stage(pa.table({"path": [str(root / row["path"])]})).num_rows == 0
    assert "too many frames" in stage.errors.rows[0]["error"]
    assert "max_frames" in stage.errors.rows[0]["error"]
    assert ProbeStage(max_frames=claimed + 1)(pa.table({"path": [str(root / row["path"])]})
                                              ).num_rows == 1


def test_errors_are_written_to_errors_dir(tmp_path, bad_files):
    stage = ProbeStage(errors_dir=str(tmp_path / "errors"))
    stage(pa.table({"path": [str(bad_files["empty"]), str(bad_files["missing"])]}))
    files = list((tmp_path / "errors").glob("probe-*.parquet"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    assert table.column("path").to_pylist() == [str(bad_files["empty"]),
                                                str(bad_files["missing"])]
    assert set(table.column("stage").to_pylist()) == {"probe"}


def test_missing_path_column_is_a_programming_error():
    with pytest.raises(ValueError, match=r"lack column\(s\) \['path'\]"):
        ProbeStage()(pa.table({"file": ["x.mp4"]}))
