"""`tubelet generate` refuses bad input with one line and exit 2, before Ray starts."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.cli import main
from tests.exports import write_export, write_vae


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_export(root / "run" / "export"), write_vae(root / "vae.safetensors")


def generate(tmp_path, checkpoint, prompts, *flags):
    return main(["generate", "--checkpoint", str(checkpoint), "--prompts", str(prompts),
                 "--output", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize("rows, needle", [
    ([{"prompt": ""}], "line 1: empty or missing prompt"),
    ([{"prompt": "a", "width": 72}], "line 1: width 72 is not a multiple of 16 .*valid: 64"),
    ([{"prompt": "a", "frames": 6}], "line 1: frames 6 .*nearest valid: 5"),
    ([{"prompt": "a", "steps": -2}], "line 1: steps must be >= 1"),
    ([{"prompt": "a"}, {"prompt": "b", "id": "00001"}], "duplicate id"),
])
def test_bad_rows_exit_2_with_one_line(tmp_path, capsys, models, rows, needle):
    import ray

    export, vae = models
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generate(tmp_path, export.parent, f, "--vae", str(vae)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tubelet generate: ")
    assert re.search(needle, err[0]), err[0]
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_bad_checkpoints_and_vaes_exit_2(tmp_path, capsys, models):
    export, vae = models
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n")
    cases = [
        ((tmp_path / "nowhere", "--vae", str(vae)), "not a training run, an export or a"),
        ((vae.parent, "--vae", str(vae)), "not a training run, an export or a"),  # foreign
        ((export, "--vae", str(tmp_path / "no.safetensors")), "VAE checkpoint .* not found"),
        ((export, "--vae", str(vae), "--steps", "0"), "steps: must be >= 1|steps must be >= 1"),
        ((export, "--vae", str(vae), "--cfg", "-1"), "cfg must be >= 0"),
    ]
    for (ckpt, *flags), needle in cases:
        assert generate(tmp_path, ckpt, f, *flags) == 2, needle
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(needle, err[0]), err


def test_vae_whose_channels_the_dit_does_not_take(tmp_path, capsys, models):
    _, vae = models
    export = write_export(tmp_path / "e16", in_channels=16)
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n")
    assert generate(tmp_path, export, f, "--vae", str(vae)) == 2
    assert "4-channel latents but the DiT" in capsys.readouterr().err
