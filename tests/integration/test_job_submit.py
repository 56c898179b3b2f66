"""`ray job submit --working-dir . -- python -m pipeline preprocess ...` to a local Ray head.

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

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ray_cli(*args, env, timeout=300):
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_preprocess_as_a_ray_job(tmp_path):
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
    finally:
        ray_cli("stop", "--force", env=env)
        shutil.rmtree(temp, ignore_errors=True)
