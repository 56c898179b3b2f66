"""`tubelet eval-vae --vae DIR` with a diffusers video-VAE folder, on a real local Ray (2 CPUs):
the same report as with our own checkpoint, with the folder's compression factors."""

from __future__ import annotations

import json

import pytest

from pipeline.synth import SynthConfig, synthesize
from tests.stages.test_vae_folders import save
from tests.unit.test_vae_adapters import tiny_wan
from tests.unit.test_vae_jobs import EVAL_CONFIGS, cli

pytestmark = pytest.mark.integration


def test_eval_vae_reconstructs_videos_with_a_diffusers_folder(ray_local, tmp_path):
    folder = save(tiny_wan, tmp_path / "wan")
    synthesize(SynthConfig(num_videos=2, seed=7, workers=1, max_seconds=1.5), tmp_path / "v")
    out = tmp_path / "eval"
    assert cli("eval-vae", "--vae", str(folder), "--input", str(tmp_path / "v"), "--output",
               str(out), "--config", str(EVAL_CONFIGS / "debug.yaml")) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["vae"] == str(folder) and report["compression"] == "4x8x8"
    assert report["overall"]["videos"] == 2 and not report["errors"]
    for clip in report["per_clip"]:
        assert clip["psnr"] > 0 and -1 <= clip["ssim"] <= 1  # a random VAE: any quality
