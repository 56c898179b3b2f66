"""The prompt file of `tubelet generate`: every format, per-row settings, and one clear line
naming the row for each thing a user can get wrong (before any Ray work)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.prompts import Defaults, Grid, PromptError, read_prompts, safe_name

GRID = Grid(spatial=16, temporal=4, patch_t=1)  # debug VAE (8x) x patch 2, 1 + 4k frames


def test_every_format_gives_the_same_rows(tmp_path):
    prompts = ["a red circle moving right", "a blue square moving up"]
    (tmp_path / "p.txt").write_text("\n".join(["", prompts[0], "  ", prompts[1], ""]))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(prompts) + "\n")
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    for suffix in ("txt", "jsonl", "csv", "parquet"):
        rows = read_prompts(tmp_path / f"p.{suffix}", Defaults(), GRID)
        assert [r["prompt"] for r in rows] == prompts, suffix
        assert all(r["height"] == 128 and r["frames"] == 9 for r in rows)
        assert len({r["id"] for r in rows}) == 2


def test_per_row_settings_override_the_defaults(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "id": "wide", "height": 64, "width": 112,
                             "frames": 5, "seed": 7, "steps": 3, "cfg": 1.5, "fps": 12,
                             "negative_prompt": "blur"}) + "\n" + json.dumps({"prompt": "b"}))
    wide, default = read_prompts(f, Defaults(height=32, width=32, steps=2), GRID)
    assert (wide["id"], wide["height"], wide["width"], wide["frames"], wide["seed"],
            wide["steps"], wide["cfg"], wide["fps"], wide["negative_prompt"]) == \
        ("wide", 64, 112, 5, 7, 3, 1.5, 12.0, "blur")
    assert (default["height"], default["width"], default["steps"]) == (32, 32, 2)


@pytest.mark.parametrize("line, needle", [
    ({"prompt": ""}, "line 2: empty or missing prompt"),
    ({"id": "x"}, "line 2: empty or missing prompt"),
    ({"prompt": "a", "height": 100}, "line 2: height 100 is not a multiple of 16 .*nearest "
                                     "valid: 96"),
    ({"prompt": "a", "frames": 8}, "line 2: frames 8 is not 1 \\+ 4k.*nearest valid: 9"),
    ({"prompt": "a", "steps": 0}, "line 2: steps must be >= 1"),
    ({"prompt": "a", "cfg": -1}, "line 2: cfg must be >= 0"),
    ({"prompt": "a", "seed": "x"}, "line 2: seed 'x' is not an integer"),
    ({"prompt": "a", "colour": "red"}, "line 2: unknown field"),
    ({"prompt": "a", "id": "first"}, "duplicate id.*'first' \\(lines 1 and 2\\)"),
])
def test_a_bad_row_is_one_error_naming_its_line(tmp_path, line, needle):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "id": "first"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(PromptError, match=needle):
        read_prompts(f, Defaults(), GRID)


def test_malformed_files_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(PromptError, match="line 2: not JSON"):
        read_prompts(tmp_path / "p.jsonl", Defaults(), GRID)
    (tmp_path / "p.yaml").write_text("prompt: a")
    with pytest.raises(PromptError, match="unknown prompt file type"):
        read_prompts(tmp_path / "p.yaml", Defaults(), GRID)
    with pytest.raises(PromptError, match="not found"):
        read_prompts(tmp_path / "missing.txt", Defaults(), GRID)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt", Defaults(), GRID)


@pytest.mark.parametrize("id_", ["../x", "../../etc/passwd", "/abs/path", "a\\b", ".hidden",
                                 "x" * 5000, "ünï cødé", "CON", "a b"])
def test_no_id_writes_outside_the_output_folder(tmp_path, id_):
    name = safe_name(id_)
    assert len(name) <= 80 and "/" not in name and "\\" not in name
    assert not name.startswith(".")
    out = (tmp_path / "videos" / f"{name}.mp4").resolve()
    assert out.parent == (tmp_path / "videos").resolve()


def test_safe_names_of_distinct_ids_differ():
    ids = ["a/b", "a_b", "a?b", "x" * 200, "x" * 201]
    assert len({safe_name(i) for i in ids}) == len(ids)
    assert safe_name("plain-id_1.0") == "plain-id_1.0"  # safe ids are kept as they are


def test_nul_in_an_id_is_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "id": "a\x00b"}) + "\n")
    with pytest.raises(PromptError, match="NUL"):
        read_prompts(f, Defaults(), GRID)


def test_grid_nearest_values():
    g = Grid(spatial=16, temporal=4, patch_t=2)  # latent frames must be even: 5, 13, 21...
    assert g.frames_ok(5) and not g.frames_ok(9) and g.nearest_frames(9) == 5
    assert g.nearest_side(8) == 16 and g.nearest_side(100) == 96


def test_the_demo_prompts_are_valid_for_the_demo_model():
    """configs/prompts/demo.jsonl (make demo): 16:9, 9:16 and 1:1, 9 and 17 frames, on the
    16 px grid of the shipped VAE (8x) and the DiT's 2x2 patches, each asking for a colour,
    a shape and a direction that `tubelet eval` can check."""
    from pathlib import Path

    from pipeline.eval import parse_prompt

    path = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "demo.jsonl"
    rows = read_prompts(path, Defaults(), Grid(spatial=16, temporal=4, patch_t=1))
    assert len(rows) >= 6
    assert {(r["width"], r["height"]) for r in rows} == {(176, 96), (96, 176), (128, 128)}
    assert {r["frames"] for r in rows} == {9, 17}
    assert all(None not in parse_prompt(r["prompt"]).values() for r in rows)
