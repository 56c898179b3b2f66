"""`python -m pipeline.local`: the Ray jobs' training loops in one process, with Ray unimportable.

The DiT run goes through the module's CLI in a subprocess whose import system refuses `ray`
(what a GPU box without Ray sees); the VAE run is a decoder-only fine-tune of a saved VAE on real
synthetic mp4s (the same subprocess guard): the encoder and the latent scaling must come out
bit-identical to the init's, the decoder must have trained and the held-out loss fallen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from models.export import load_exported
from models.vae import VideoVAE, load_vae, save_vae
from pipeline.config import to_dict
from pipeline.synth import SynthConfig, synthesize
from tests.exports import write_vae
from tests.unit.test_train_data import write_latents
from tests.unit.test_train_worker import debug_config
from tests.unit.test_vae_jobs import CONFIGS as VAE_CONFIGS
from tests.unit.test_vae_jobs import debug_config as vae_debug_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# `python -c` prelude: importing ray (or any ray.* module) fails, as where it is not installed
NO_RAY = """
import sys, importlib.abc
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray' (blocked by the test)")
sys.meta_path.insert(0, NoRay())
from pipeline.local import main
code = main(sys.argv[1:])
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray was imported"
sys.exit(code)
"""


def local(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_RAY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_dit_trains_in_one_process_without_ray(tmp_path):
    latents = write_latents(tmp_path / "latents")
    vae = write_vae(tmp_path / "vae.safetensors", scaling_factor=(0.5, 1.0, 2.0, 4.0))
    (tmp_path / "run.json").write_text(json.dumps({"vae": str(vae)}))  # preprocess's record
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(to_dict(debug_config())))
    run = tmp_path / "run"
    done = local("train", "--data", str(latents), "--output", str(run), "--config", str(config),
                 "--device", "cpu", "--set", "steps=12", "--set", "checkpoint_every=6",
                 "--set", "log_every=10",
                 "--set", "optim.warmup_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # the loss map, every log_every-th step: each real sample's flow time and its loss per
    # latent frame (positive: a squared error)
    mapped = [r for r in rows if "t" in r]
    assert [r["step"] for r in mapped] == [10]
    assert all(len(r["t"]) == len(r["frame_loss"]) == r["samples"] for r in mapped)
    assert {len(f) for r in mapped for f in r["frame_loss"]} <= {2, 3}  # the buckets' latent T
    assert all(0 < v < 100 for r in mapped for f in r["frame_loss"] for v in f)
    assert (run / "checkpoints" / "step_00000012" / ".metadata").is_file()
    dit, _, exported = load_exported(run / "export")
    assert exported["step"] == 12 and sum(p.numel() for p in dit.parameters()) > 0
    assert exported["train"]["latents"] == {"vae": str(vae), "shift_factor": [0.0],
                                            "scaling_factor": [0.5, 1.0, 2.0, 4.0]}
    record = json.loads((run / "run.json").read_text())
    assert record["runner"] == "pipeline.local" and record["steps"] == 12
    # --resume continues the run where it stopped, as the Ray job does
    again = local("train", "--data", str(latents), "--output", str(run), "--config",
                  str(config), "--device", "cpu", "--set", "steps=14", "--resume")
    assert again.returncode == 0, again.stderr[:3000]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    # a CUDA device where there is none: one line, exit 2
    if not torch.cuda.is_available():
        bad = local("train", "--data", str(latents), "--output", str(tmp_path / "gpu"),
                    "--device", "cuda")
        assert bad.returncode == 2 and "no CUDA GPU" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_vae_decoder_finetune_keeps_the_encoder_and_the_latent_scaling(tmp_path):
    synthesize(SynthConfig(num_videos=8, seed=3, workers=1, max_seconds=2.0), tmp_path / "v")
    cfg = vae_debug_config()
    torch.manual_seed(0)
    init = VideoVAE(cfg.model)
    init.config = replace(init.config, scaling_factor=0.7, shift_factor=0.2)
    save_vae(init, tmp_path / "init.safetensors")
    run = tmp_path / "run"
    done = local("train-vae", "--input", str(tmp_path / "v"), "--output", str(run),
                 "--config", str(VAE_CONFIGS / "debug.yaml"), "--device", "cpu",
                 "--set", f"init={tmp_path / 'init.safetensors'}", "--set", "freeze_encoder=true",
                 "--set", "steps=30", "--set", "data.val_every=15", "--set", "optim.lr=0.003",
                 "--set", "data.stages=[]", "--set", "optim.ema_decay=0.8")
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_vae(run / "export" / "vae.safetensors")
    assert (out.config.scaling_factor, out.config.shift_factor) == (0.7, 0.2)  # not refitted
    a, b = init.state_dict(), out.state_dict()
    for k in a:
        if k.startswith("encoder."):
            assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    val = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in val if r["split"] == "val"}
    assert sorted(val) == [0, 15, 30] and val[30] < 0.9 * val[0], val
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["held_out_psnr"] > 0 and 0 < summary["held_out_ssim"] <= 1


def test_freeze_encoder_needs_an_init(tmp_path):
    done = local("train-vae", "--input", str(tmp_path), "--output", str(tmp_path / "run"),
                 "--config", str(VAE_CONFIGS / "debug.yaml"), "--set", "freeze_encoder=true")
    assert done.returncode == 2
    assert "freeze_encoder: needs init" in done.stderr
    missing = local("train-vae", "--input", str(tmp_path), "--output", str(tmp_path / "run"),
                    "--config", str(VAE_CONFIGS / "debug.yaml"),
                    "--set", f"init={tmp_path / 'nope.safetensors'}")
    assert missing.returncode == 2 and "init:" in missing.stderr and "nope" in missing.stderr
