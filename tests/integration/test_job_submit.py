"""`ray job submit --working-dir . -- python -m pipeline preprocess|generate ...` to a local
Ray head (one head for both jobs: starting one is most of the time).

Ray 2.60 needs token auth for job submission: RAY_AUTH_MODE=token, `ray get-auth-token
--generate`, then `ray start --head` (all inherited by the CLI calls below).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pds
import pytest

from pipeline.synth import SynthConfig, synthesize
from tests.exports import write_export, write_vae

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ray_cli(*args, env, timeout=300):
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_preprocess_and_generate_as_ray_jobs(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    synthesize(SynthConfig(num_videos=3, seed=11, workers=1), tmp_path / "videos")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    assert ray_cli("get-auth-token", "--generate", env=env).returncode == 0
    temp = Path("/tmp") / f"rayjob{os.getpid()}"  # short: unix socket paths are limited
    started = ray_cli("start", "--head", "--num-cpus=2", "--object-store-memory=300000000",
                      "--port=6391", "--dashboard-port=8291", "--disable-usage-stats",
                      f"--temp-dir={temp}", env=env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        out = tmp_path / "out"
        job = ray_cli("job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", ".",
                      "--", "python", "-m", "pipeline", "preprocess", "--input",
                      str(tmp_path / "videos"), "--output", str(out), env=env, timeout=400)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        summary = json.loads((out / "summary.json").read_text())
        rows = pds.dataset(out / "latents", format="parquet").to_table().num_rows
        assert rows == summary["clips_written"] >= 3

        export, vae = write_export(tmp_path / "export"), write_vae(tmp_path / "vae.safetensors")
        (tmp_path / "prompts.txt").write_text("a red circle moving right\na blue square\n")
        gen = tmp_path / "gen"
        job = ray_cli("job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", ".",
                      "--", "python", "-m", "pipeline", "generate", "--checkpoint", str(export),
                      "--prompts", str(tmp_path / "prompts.txt"), "--output", str(gen),
                      "--vae", str(vae), "--steps", "2", "--width", "32", "--height", "32",
                      "--frames", "5", env=env, timeout=400)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        videos = sorted(p.name for p in (gen / "videos").glob("*.mp4"))
        assert videos == ["00001.mp4", "00002.mp4"]
        assert pds.dataset(gen / "manifest", format="parquet").count_rows() == 2
    finally:
        ray_cli("stop", "--force", env=env)
        shutil.rmtree(temp, ignore_errors=True)
