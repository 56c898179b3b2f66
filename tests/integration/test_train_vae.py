"""`tubelet train-vae` and `eval-vae` on a real local Ray (2 CPUs).

One scenario, asserted by several tests (Ray Train runs cost ~20 s each on 2 cores):
  train   train-vae --config configs/train-vae/debug.yaml on 12 synthetic videos (4 held out),
          2 DDP workers, 20 steps; then --resume --workers 1 to 30 steps
  eval    eval-vae --config configs/eval-vae/debug.yaml of the trained VAE on 2 videos of
          another seed, with --videos
(SSIM and PSNR themselves are checked on known inputs in tests/unit/test_vae_jobs.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.vae import load_vae
from pipeline.synth import SynthConfig, synthesize
from tests.unit.test_vae_jobs import CONFIGS, EVAL_CONFIGS, cli

pytestmark = pytest.mark.integration
# 4 held-out videos and an EMA (decay 0.8) for validation: with 2 held-out crops and the raw
# weights the debug VAE's val loss swings +-30% from step to step at lr 2e-3..3e-3 and the 15%
# drop by step 20 failed in CI; with these, three runs gave 0.531 -> 0.386 (0.73x) each.
SETS = ["ray.object_store_mb=300", "data.val_every=10", "checkpoint_every=10",
        "data.val_videos=4", "optim.ema_decay=0.8", "log_every=100"]


@pytest.fixture(scope="module")
def scenario(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    synthesize(SynthConfig(num_videos=12, seed=3, workers=1, max_seconds=2.0), root / "videos")
    synthesize(SynthConfig(num_videos=2, seed=7, workers=1, max_seconds=2.0), root / "heldout")
    run = root / "run"
    base = ["--input", str(root / "videos"), "--output", str(run),
            "--config", str(CONFIGS / "debug.yaml"), *[a for s in SETS for a in ("--set", s)]]
    codes = [cli("train-vae", *base, "--set", "steps=20", "--workers", "2")]
    first = metrics(run)
    codes.append(cli("train-vae", *base, "--set", "steps=30"))  # occupied, no --resume
    codes.append(cli("train-vae", *base, "--set", "steps=30", "--workers", "1", "--resume"))
    codes.append(cli("eval-vae", "--vae", str(run / "export" / "vae.safetensors"), "--input",
                     str(root / "heldout"), "--output", str(root / "eval"), "--videos",
                     "--config", str(EVAL_CONFIGS / "debug.yaml")))
    return {"root": root, "run": run, "codes": codes, "first": first}


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_held_out_loss_and_writes_its_outputs(scenario):
    run = scenario["run"]
    assert scenario["codes"][0] == 0
    val = {r["step"]: r["loss"] for r in scenario["first"] if r["split"] == "val"}
    assert sorted(val) == [0, 10, 20]
    assert val[20] < 0.85 * val[0], val
    assert (run / "checkpoints" / "step_00000020" / "vae.safetensors").is_file()
    for png in ("loss.png", "recon.png"):
        assert (run / png).stat().st_size > 2000, png
    record = json.loads((run / "run.json").read_text())
    assert record["held_out_psnr"] > 0 and 0 < record["held_out_ssim"] <= 1
    assert record["val_loss"][0][0] == 0


def test_resume_continues_the_step_count(scenario):
    run = scenario["run"]
    assert scenario["codes"][1:3] == [2, 0]  # refused without --resume, then resumed
    rows = metrics(run)
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 31))
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 10, 20, 30]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000020", "step_00000030"]  # keep_checkpoints: 2
    assert load_vae(run / "export" / "vae.safetensors").latent_channels == 4


def test_eval_reports_per_video_metrics_and_writes_mp4s(scenario):
    out = scenario["root"] / "eval"
    assert scenario["codes"][3] == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["compression"] == "4x8x8" and report["overall"]["videos"] == 2
    for v in report["per_video"]:
        assert v["clips"] >= 1 and 0 < v["ssim"] <= 1 and v["psnr"] > 0
    # a 30-step debug VAE: 7.6-11 dB measured across runs (DDP data order varies; a random
    # init gives 9-13 dB on these clips): a sane report, not proof of learning, which is
    # test_training_lowers_held_out_loss_and_writes_its_outputs's to show
    assert 6 < report["overall"]["psnr"] < 40
    assert (out / "eval.md").read_text().count("\n") == 5  # header (2 lines), 2 videos, all
    mp4s = sorted((out / "videos").glob("*.mp4"))
    assert len(mp4s) == report["overall"]["clips"]
    import av
    with av.open(str(mp4s[0])) as f:
        assert f.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in f.decode(video=0)) == report["per_clip"][0]["num_frames"]
