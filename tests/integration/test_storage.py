"""The same jobs with local paths and with `s3://` paths (a real S3-compatible server on
loopback, tests/s3.py): videos uploaded -> `preprocess` writes latents -> `train` reads them
and writes its run folder -> `generate` loads the export and writes videos, manifest and
gallery -> `eval` measures them; kill -9 mid-preprocess and mid-generate then rerun: every
item exactly once and no partial object; a Ray Train worker killed mid-run resumes from a
checkpoint in the bucket; bad storage input is one line, exit 2, before Ray, in bounded
time."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from actors.common.storage import resolve
from pipeline.cli import main
from pipeline.synth import SynthConfig, synthesize
from tests.s3 import Bucket, aws_env, new_bucket, s3_server

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SETS = ["--set", "ray.object_store_mb=300"]
TRAIN = ["--config", str(ROOT / "configs/train/debug.yaml"), "--set", "checkpoint_every=3",
         "--set", "log_every=1", "--set", "worker.num_cpus=0.5", "--set", "loader.num_cpus=0.2",
         *SETS]
PROMPTS = ('{"id": "wide", "prompt": "a red square moving left", "height": 32, "width": 48, '
           '"frames": 5, "steps": 2}\n{"id": "../../escape", "prompt": "a blue circle", '
           '"height": 32, "width": 32, "frames": 5, "steps": 2}\n')


@dataclass
class Where:
    """A job's root: a local folder, or a prefix in the test bucket."""

    kind: str
    root: str
    bucket: Bucket | None = None

    def put(self, local: Path, name: str) -> str:
        """`local` (a folder) placed under the root as `name`; its location."""
        if self.bucket is None:
            shutil.copytree(local, Path(self.root) / name)
            return f"{self.root}/{name}"
        return self.bucket.put_tree(local, f"{self.root.split('/', 3)[3]}/{name}")

    def keys(self, name: str) -> list[str]:
        """Every file under root/name, relative to it."""
        store = resolve(f"{self.root}/{name}")
        return [f.path[len(store.path) + 1:] for f in store.files()]

    def read(self, name: str) -> bytes:
        return resolve(f"{self.root}/{name}").read_bytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with s3_server() as endpoint, aws_env(endpoint, tmp_path_factory.mktemp("aws")):
        yield endpoint


@pytest.fixture(scope="module", params=["local", "s3"])
def where(request, server, tmp_path_factory) -> Where:
    if request.param == "local":
        return Where("local", str(tmp_path_factory.mktemp("local")))
    bucket = new_bucket(server)
    return Where("s3", f"{bucket.uri}/jobs", bucket)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    synthesize(SynthConfig(num_videos=4, seed=3, workers=1), folder)
    return folder


@pytest.fixture(scope="module")
def jobs(where, videos, ray_local, tmp_path_factory):
    """preprocess -> train -> generate -> eval, every path under `where`."""
    src = where.put(videos, "videos")
    local = tmp_path_factory.mktemp("prompts")
    (local / "prompts.jsonl").write_text(PROMPTS)
    prompts = where.put(local, "prompts") + "/prompts.jsonl"
    r = where.root
    codes = [
        main(["preprocess", "--input", src, "--output", f"{r}/pre", *SETS]),
        main(["train", "--data", f"{r}/pre/latents", "--output", f"{r}/run", *TRAIN,
              "--set", "steps=4"]),
        main(["generate", "--checkpoint", f"{r}/run", "--prompts", prompts, "--output",
              f"{r}/gen", *SETS]),
        main(["eval", "--videos", f"{r}/gen", "--reference", src, "--output", f"{r}/eval",
              *SETS]),
    ]
    again = main(["preprocess", "--input", src, "--output", f"{r}/pre", *SETS])
    return codes, again


def test_preprocess_train_generate_eval(where, jobs):
    codes, again = jobs
    assert codes == [0, 0, 0, 0] and again == 0
    latents = [k for k in where.keys("pre/latents") if k.endswith(".parquet")]
    summary = json.loads(where.read("pre/summary.json"))
    assert latents and summary["clips_in_dataset"] >= 4 and summary["errors"] == 0
    rows = pq.read_table(io.BytesIO(where.read(f"pre/latents/{latents[0]}"))).to_pylist()
    assert all(r["caption"] for r in rows)  # captions.jsonl in the bucket was read
    assert json.loads(where.read("pre/run.json"))["clips_written"] == 0  # the rerun: nothing
    run = where.keys("run")
    assert {"export/model.safetensors", "export/config.json", "metrics.jsonl", "loss.png",
            "run.json", "config.yaml"} <= set(run)
    assert any(k.startswith("checkpoints/step_00000004/") for k in run)
    steps = [json.loads(ln)["step"] for ln in where.read("run/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    gen = where.keys("gen")
    assert {"index.html", "summary.json", "videos/wide.mp4"} <= set(gen)
    assert all(not k.startswith("..") and "/../" not in k for k in gen)  # ids stay inside
    assert sum(k.startswith("manifest/") for k in gen) == 2
    with av.open(io.BytesIO(where.read("gen/videos/wide.mp4"))) as f:
        assert len(list(f.decode(video=0))) == 5
    report = json.loads(where.read("eval/eval.json"))
    assert report["aggregate"]["generated"]["videos"] == 2
    assert report["aggregate"]["reference"]["videos"] == 4


def test_records_hold_no_secrets(where, jobs):
    for name in ("pre/run.json", "pre/config.yaml", "run/run.json", "run/config.yaml",
                 "gen/run.json", "gen/summary.json", "eval/run.json"):
        text = where.read(name).decode()
        assert "tubelet-test-secret" not in text and "tubelet-test\"" not in text, name


def killed_then_rerun(cmd: list[str], done, timeout: float = 240) -> subprocess.Popen:
    """Run `cmd` (a `python -m pipeline ...` command) as its own process group, SIGKILL it
    (the driver and its local Ray) once `done()` holds, then run it again to the end."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    return proc


def test_kill_9_mid_preprocess_and_generate_then_rerun(where, jobs, tmp_path):
    r, cli = where.root, [sys.executable, "-m", "pipeline"]
    src = f"{r}/videos"
    target = f"{r}/killed-pre"
    killed_then_rerun(
        [*cli, "preprocess", "--input", src, "--output", target, "--set", "ray.num_cpus=2",
         "--set", "write.batch_size=1", "--set", "encode.batch_size=1", *SETS],
        lambda: sum(k.endswith(".parquet") for k in where.keys("killed-pre/latents")) >= 1)
    files = [k for k in where.keys("killed-pre/latents") if k.endswith(".parquet")]
    ids = [i for k in files  # every object a whole Parquet file
           for i in pq.read_table(io.BytesIO(where.read(f"killed-pre/latents/{k}")))
           .column("id").to_pylist()]
    clean = [i for k in where.keys("pre/latents") if k.endswith(".parquet")
             for i in pq.read_table(io.BytesIO(where.read(f"pre/latents/{k}")))
             .column("id").to_pylist()]
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(clean)

    many = "".join(json.dumps({"id": f"v{i}", "prompt": "a red square", "height": 32,
                               "width": 32, "frames": 5, "steps": 2, "seed": i}) + "\n"
                   for i in range(6))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "many.jsonl").write_text(many)
    prompts = where.put(tmp_path / "p", "many-prompts") + "/many.jsonl"
    killed_then_rerun(
        [*cli, "generate", "--checkpoint", f"{r}/run", "--prompts", prompts, "--output",
         f"{r}/killed-gen", *SETS],
        lambda: any(k.endswith(".mp4") for k in where.keys("killed-gen/videos")))
    videos = [k for k in where.keys("killed-gen/videos") if k.endswith(".mp4")]
    assert sorted(videos) == [f"v{i}.mp4" for i in range(6)]
    for k in videos:  # whole files only
        with av.open(io.BytesIO(where.read(f"killed-gen/videos/{k}"))) as f:
            assert len(list(f.decode(video=0))) == 5
    summary = json.loads(where.read("killed-gen/summary.json"))
    assert summary["videos"] == 6 and summary["generated"] + summary["already_done"] == 6


def test_a_killed_train_worker_resumes_from_a_checkpoint_in_the_bucket(where, jobs):
    if where.kind == "local":
        pytest.skip("the local case is tests/integration/test_train.py's")
    run, killed = f"{where.root}/run-killed", []

    def watch() -> None:  # rank 1's process, once step 5 is in the bucket's metrics
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                lines = where.read("run-killed/metrics.jsonl").splitlines()
                record = json.loads(where.read("run-killed/workers/rank1.json"))
            except (FileNotFoundError, OSError):
                time.sleep(0.1)
                continue
            if lines and json.loads(lines[-1])["step"] >= 5:
                os.kill(record["pid"], signal.SIGKILL)
                killed.append(record["pid"])
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    code = main(["train", "--data", f"{where.root}/pre/latents", "--output", run, *TRAIN,
                 "--set", "steps=9", "--workers", "2"])
    thread.join(timeout=1)
    assert code == 0 and killed
    steps = [json.loads(ln)["step"] for ln in where.read("run-killed/metrics.jsonl").splitlines()]
    assert steps == list(range(1, 10))  # each step once: resumed at the bucket's checkpoint
    assert any(k.startswith("checkpoints/step_00000009/") for k in where.keys("run-killed"))


@pytest.mark.parametrize("argv, needle", [
    (["preprocess", "--input", "s3://no-such-bucket-tubelet/v", "--output", "OUT/p"],
     "bucket 'no-such-bucket-tubelet' does not exist"),
    (["train", "--data", "s3://no-such-bucket-tubelet/l", "--output", "OUT/r"],
     "bucket 'no-such-bucket-tubelet' does not exist"),
    (["generate", "--checkpoint", "s3://no-such-bucket-tubelet/r", "--prompts", "P",
      "--output", "OUT/g"], "bucket 'no-such-bucket-tubelet' does not exist"),
    (["generate", "--checkpoint", "CKPT", "--prompts", "P", "--output",
      "s3://no-such-bucket-tubelet/g"], "bucket 'no-such-bucket-tubelet' does not exist"),
])
def test_bad_storage_input_is_one_line_before_ray(argv, needle, server, tmp_path, capsys,
                                                  monkeypatch):
    def no_ray(*_, **__):
        raise AssertionError("Ray was started")

    for command in ("preprocess", "train", "generate"):
        monkeypatch.setattr(f"pipeline.{command}.ray_session", no_ray)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red square"}\n')
    swap = {"OUT": str(tmp_path), "P": str(tmp_path / "p.jsonl"),
            "CKPT": str(ROOT / "weights/dit-demo")}
    argv = [next((a.replace(k, v) for k, v in swap.items() if a.startswith(k)), a)
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_an_unreachable_endpoint_fails_in_bounded_time(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with aws_env(f"http://127.0.0.1:{port}", tmp_path):
        start = time.perf_counter()
        code = main(["preprocess", "--input", "s3://bucket/videos", "--output",
                     str(tmp_path / "out"), "--set", "storage.connect_timeout=1",
                     "--set", "storage.retries=1"])
        took = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2 and "endpoint does not answer" in err and len(err.splitlines()) == 1
    assert took < 30, took


def test_train_vae_and_eval_vae_in_the_bucket(where, jobs):
    if where.kind == "local":
        pytest.skip("the local case is tests/integration/test_train_vae.py's")
    from tests.unit.test_vae_jobs import CONFIGS, EVAL_CONFIGS

    r = where.root
    assert main(["train-vae", "--input", f"{r}/videos", "--output", f"{r}/vae", "--config",
                 str(CONFIGS / "debug.yaml"), "--set", "steps=8", "--set", "data.val_videos=1",
                 "--set", "checkpoint_every=4", *SETS]) == 0
    run = set(where.keys("vae"))
    assert {"export/vae.safetensors", "metrics.jsonl", "loss.png", "recon.png",
            "run.json"} <= run
    assert any(k.startswith("checkpoints/step_00000008/") for k in run)
    assert main(["eval-vae", "--vae", f"{r}/vae/export/vae.safetensors", "--input",
                 f"{r}/videos", "--output", f"{r}/eval-vae", "--videos", "--config",
                 str(EVAL_CONFIGS / "debug.yaml"), *SETS]) == 0
    report = json.loads(where.read("eval-vae/eval.json"))
    assert report["overall"]["videos"] == 4 and not report["errors"]
    assert sum(k.endswith(".mp4") for k in where.keys("eval-vae/videos")) == len(
        report["per_clip"])
