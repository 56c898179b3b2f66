"""`tubelet generate` end to end on a real local Ray: mp4 files of exactly the requested
sizes and lengths (read back with PyAV), the manifest and the gallery; a rerun skips what is
done; kill -9 mid-job then rerun gives every id exactly once with no half-written file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.dataset as pds
import pytest
import torch

from pipeline.cli import main
from tests.exports import write_export, write_vae
from tests.faults import Killer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# Three aspect ratios and two lengths in one job (debug DiT: 16 px grid, 1 + 4k frames).
ROWS = [{"id": "wide", "prompt": "a red circle moving right", "width": 112, "height": 64},
        {"id": "tall", "prompt": "a blue square moving up", "width": 64, "height": 112,
         "frames": 5},
        {"id": "../square", "prompt": "a green triangle", "width": 64, "height": 64,
         "seed": 3, "negative_prompt": "blurry"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_export(root / "run" / "export"), write_vae(root / "vae.safetensors")


def prompt_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(export, vae, prompts, out, *extra):
    return ["generate", "--checkpoint", str(export), "--prompts", str(prompts), "--output",
            str(out), "--vae", str(vae), "--steps", "2", "--frames", "9", *extra,
            "--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=300"]


def manifest(out: Path) -> list[dict]:
    return pds.dataset(sorted((out / "manifest").glob("*.parquet"))).to_table().to_pylist()


def test_generate_writes_exact_videos_manifest_and_gallery(tmp_path, models, capsys):
    export, vae = models
    prompts, out = prompt_file(tmp_path / "p.jsonl", ROWS), tmp_path / "out"
    assert main(args(export.parent, vae, prompts, out)) == 0
    rows = {r["id"]: r for r in manifest(out)}
    assert sorted(rows) == sorted(r["id"] for r in ROWS)
    for want in ROWS:
        row = rows[want["id"]]
        path = (out / row["file"]).resolve()
        assert path.parent == (out / "videos").resolve()  # "../square" stays inside
        with av.open(str(path)) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == want.get("frames", 9) == row["frames"]
        assert frames[0].shape == (want["height"], want["width"], 3)
        assert row["checkpoint_digest"] and row["sample_seconds"] > 0
        assert (out / row["sheet"]).is_file()
    page = (out / "index.html").read_text()
    assert page.count("<video") == 3 and "a red circle moving right" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated"] == 3
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()

    capsys.readouterr()
    assert main(args(export.parent, vae, prompts, out)) == 0  # rerun: nothing to do
    assert "0 videos generated (3 already done)" in capsys.readouterr().out
    assert len(manifest(out)) == 3

    # tiny generate -> eval: the manifest's prompts are what adherence is checked against
    report_dir = tmp_path / "eval"
    assert main(["eval", "--videos", str(out), "--output", str(report_dir),
                 "--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=300"]) == 0
    report = json.loads((report_dir / "eval.json").read_text())
    by_prompt = {r["prompt"]: r for r in report["per_video"]}
    assert sorted(by_prompt) == sorted(r["prompt"] for r in ROWS)
    assert by_prompt["a red circle moving right"]["color"] == "red"  # parsed from the prompt
    assert by_prompt["a green triangle"]["direction"] is None  # not asked: not scored
    assert report["aggregate"]["generated"]["videos"] == 3
    assert 0 <= report["aggregate"]["generated"]["vbench_flicker"] <= 1
    assert (report_dir / "eval.png").stat().st_size > 2000
    assert "| generated | 3 |" in (report_dir / "eval.md").read_text()


def test_kill_9_then_rerun_gives_every_id_once(tmp_path, models):
    export, vae = models
    rows = [{"id": f"v{i}", "prompt": f"a red circle number {i}", "seed": i, "steps": 100}
            for i in range(12)]
    prompts, out = prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "out"
    size = ("--width", "64", "--height", "64", "--frames", "17")  # ~1 s of sampling a video
    cmd = [sys.executable, "-m", "pipeline", *args(export, vae, prompts, out, *size)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "manifest").glob("*.parquet")):
            time.sleep(0.2)
        assert list((out / "manifest").glob("*.parquet")), "no video was finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait()
    before = len(manifest(out))
    assert main(args(export, vae, prompts, out, *size)) == 0
    ids = [r["id"] for r in manifest(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows), ids  # each exactly once
    assert before < len(rows)  # killed mid-job
    assert not [p for p in (out / "videos").iterdir() if p.name.startswith(".")]


def test_killed_sampler_decode_and_encode_actors_lose_nothing(tmp_path, models):
    """SIGKILL a busy sampler, then a busy VAE decode, then a busy mp4 encode actor mid-job:
    Ray Data restarts each and retries its batch; the job finishes in one run with every id
    exactly once, every mp4 whole (the requested frames) and no temp file left behind."""
    export, vae = models
    rows = [{"id": f"k{i}", "prompt": f"a blue square number {i}", "seed": i}
            for i in range(6)]
    prompts, out = prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "out"
    size = ("--width", "64", "--height", "64", "--steps", "8",
            "--set", "share_processes=false")  # a pool per stage, each killed once
    plan = [(stage, lambda: True) for stage in ("SampleStage", "VAEDecodeStage",
                                                 "Mp4EncodeStage")]
    with Killer(plan) as killer:
        assert main(args(export, vae, prompts, out, *size)) == 0
    assert sorted(killer.killed) == sorted(stage for stage, _ in plan), killer.killed
    got = manifest(out)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # each exactly once
    for r in got:
        with av.open(str(out / r["file"])) as f:
            assert sum(1 for _ in f.decode(video=0)) == 9
    assert not [p for p in (out / "videos").iterdir() if p.name.startswith(".")]


def test_parallel_and_multi_actor_jobs_make_the_same_videos(tmp_path, models, capsys):
    """K = 2 sequence parallel, and x CFG parallel (4 ranks: the sampler actor and three rank
    actors), with the shipped config on 2 CPUs (the pools are sized to fit the ranks): the
    same videos as one rank (latents agree within 1e-4, tests/integration/test_sampler_group.py;
    here: the decoded mp4 frames); two sampler actors instead of one: bitwise the same."""
    export, vae = models
    rows = ROWS[:2]
    prompts = prompt_file(tmp_path / "p.jsonl", rows)
    runs = {"one": (), "two": ("--sequence-parallel", "2"),
            "four": ("--sequence-parallel", "2", "--cfg-parallel"),
            "two_actors": ("--set", "sample.min_actors=2", "--set", "sample.max_actors=2",
                           "--set", "sample.num_cpus=0.3", "--set", "decode.num_cpus=0.3")}
    for run, extra in runs.items():
        assert main(args(export, vae, prompts, tmp_path / run, *extra)) == 0, run
        said = capsys.readouterr().out
        if run == "four":  # the 3 rank actors share what the pools leave: one line says so
            assert "[generate] 2 CPUs: sampler ranks 0.31 CPU each (auto)" in said, said
    for row in rows:
        videos = {}
        for run in runs:
            with av.open(str(tmp_path / run / "videos" / f"{row['id']}.mp4")) as f:
                videos[run] = np.stack([fr.to_ndarray(format="rgb24")
                                        for fr in f.decode(video=0)]).astype(np.int16)
        for parallel in ("two", "four"):
            assert videos["one"].shape == videos[parallel].shape
            assert np.abs(videos["one"] - videos[parallel]).mean() < 0.5  # h264, ~equal frames
        assert np.array_equal(videos["one"], videos["two_actors"])  # another actor count


def test_cached_packed_shared_process_job_gives_its_stages_latents(tmp_path, models):
    """`--cache`, packed batches and shared processes as one Ray job: every id once, each mp4
    of the requested length, and the latents the same stages give in this process."""
    from dataclasses import replace

    import pyarrow as pa

    from actors.common.stage import run_here
    from pipeline.config import resolve_config
    from pipeline.generate import GenerateConfig, generate_stages, inspect_model
    from pipeline.prompts import read_prompts

    export, vae = models
    rows = [{"id": f"p{i}", "prompt": f"a red circle number {i}", "seed": i, "width": 64,
             "height": 64} for i in range(3)] + [ROWS[0]]
    prompts, out = prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "out"
    sets = ["sampler.cache.threshold=0.5", "sampler.batch_invariant=false",
            "share_processes=true", "save_latents=true"]
    extra = ["--cache", "--steps", "8", *(a for s in sets for a in ("--set", s))]
    assert main(args(export, vae, prompts, out, *extra)) == 0
    got = {r["id"]: r for r in manifest(out)}
    assert sorted(got) == sorted(r["id"] for r in rows)
    cfg = resolve_config(GenerateConfig, "generate", None,
                         [*sets, "sampler.cache.enabled=true", f"vae.checkpoint={vae}",
                          "defaults.steps=8", "defaults.frames=9", "vae.device=cpu"], {})
    model = inspect_model(export, cfg.vae)
    table = pa.Table.from_pylist(read_prompts(prompts, cfg.defaults, model.grid))
    torch.set_num_threads(1)  # as the job's actors run
    here = run_here(table, generate_stages(replace(cfg, save_latents=True), model,
                                           tmp_path / "here", gpus=False))
    for row in here.to_pylist():
        ours = np.load(out / got[row["id"]]["latents"])
        np.testing.assert_allclose(ours, np.load(tmp_path / "here" / row["latents"]),
                                   rtol=0, atol=1e-5, err_msg=row["id"])
        with av.open(str(out / got[row["id"]]["file"])) as f:
            assert sum(1 for _ in f.decode(video=0)) == 9


def test_a_diffusers_pipeline_folder_runs_as_a_ray_job(tmp_path):
    """`tubelet generate --checkpoint FOLDER` on a Wan pipeline folder, sequence x CFG parallel
    (2 x 2 ranks: the sampler actor and three rank actors): its own text encoder, transformer +
    scheduler and VAE in the stage pools; each row's saved latents are the ones
    `WanPipeline(...)` gives for it in one process."""
    from tests.pretrained import diffusers_pipeline, write_wan_pipeline

    folder = write_wan_pipeline(tmp_path / "wan", seed=2)
    rows = [{"id": "a", "prompt": "a red square on the grass", "width": 48, "height": 32},
            {"id": "b", "prompt": "a cat", "negative_prompt": "blurred", "frames": 9,
             "seed": 4}]
    prompts = prompt_file(tmp_path / "p.jsonl", rows)
    assert main(["generate", "--checkpoint", str(folder), "--prompts", str(prompts), "--steps",
                 "2", "--frames", "5", "--height", "32", "--width", "32", "--cfg", "5",
                 "--output", str(tmp_path / "out"), "--save-latents",
                 "--sequence-parallel", "2", "--cfg-parallel",
                 "--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=300"]) == 0
    pipe = diffusers_pipeline(folder)
    done = manifest(tmp_path / "out")
    assert sorted(r["id"] for r in done) == ["a", "b"]
    for r in done:
        want = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"] or None,
                    height=r["height"], width=r["width"], num_frames=r["frames"],
                    num_inference_steps=2, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(r["seed"]),
                    output_type="latent").frames[0].float().numpy()
        got = np.load(tmp_path / "out" / r["latents"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=r["id"])
        assert (tmp_path / "out" / r["file"]).stat().st_size > 0


def test_a_node_removed_mid_job_loses_nothing(tmp_path, models):
    """A 3-node ray.cluster_utils.Cluster with a sampler actor on each of two nodes: once a
    video is finished, the worker node of a busy sampler is removed (its raylet and workers
    killed). Ray Data restarts the actor elsewhere and retries its batch; the job finishes in
    one run with every id exactly once and every mp4 whole, and a rerun finds nothing to do."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from tests.faults import NodeRemover

    if ray.is_initialized():
        ray.shutdown()
    export, vae = models
    rows = [{"id": f"n{i}", "prompt": f"a green circle number {i}", "seed": i, "steps": 60}
            for i in range(10)]
    prompts, out = prompt_file(tmp_path / "p.jsonl", rows), tmp_path / "out"
    store = 150 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
    job = args(export, vae, prompts, out, "--width", "64", "--height", "64", "--frames", "17",
               "--address", cluster.address, "--set", "sample.min_actors=2",
               "--set", "sample.max_actors=2", "--set", "sample.num_cpus=0.4",
               "--set", "sample.batch_size=1", "--set", "decode.num_cpus=0.1",
               "--set", "decode.min_actors=1", "--set", "text.num_cpus=0.05",
               "--set", "encode.num_cpus=0.05", "--set", "share_processes=false")
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        # Both sampler actors must be up before work is handed out.
        ray.data.DataContext.get_current().wait_for_min_actors_s = 120
        remover = NodeRemover(cluster, workers, "SampleStage",
                              lambda: any((out / "manifest").glob("*.parquet")))
        remover.start()
        assert main(job) == 0
        remover.join(timeout=5)
        assert remover.removed, "no busy sampler on a worker node was found to remove"
        got = manifest(out)
        assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # each once
        for r in got:
            with av.open(str(out / r["file"])) as f:
                assert sum(1 for _ in f.decode(video=0)) == 17
        assert not [p for p in (out / "videos").iterdir() if p.name.startswith(".")]
        assert main(job) == 0 and len(manifest(out)) == len(rows)  # nothing left to do
    finally:
        ray.shutdown()
        cluster.shutdown()
