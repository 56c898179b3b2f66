"""`tubelet train` on a real local Ray (2 CPUs): FSDP2 workers match one process, a killed
worker is survived exactly, `--resume` continues exactly, and `--input` trains from videos.

One scenario, asserted by several tests (Ray Train runs cost ~20 s each on 2 cores):
  reference  one process, no Ray, 28 steps
  run        `tubelet train` with 2 FSDP2 workers, 24 steps, rank 1 killed with SIGKILL after
             step 10; then `--resume --workers 1 --set data.loader=worker` to 28 steps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train import TrainConfig, run_train
from tests.unit.test_train_data import write_latents
from tests.unit.test_train_worker import CONFIGS, train, weights

pytestmark = pytest.mark.integration
SETS = ["checkpoint_every=4", "log_every=4", "optim.warmup_steps=3", "ray.object_store_mb=300",
        "worker.num_cpus=0.5", "loader.num_cpus=0.2"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # address="local": a fresh cluster even when another one runs on this machine.
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20,
             include_dashboard=False)
    yield
    ray.shutdown()


def tubelet_train(*argv: str) -> int:
    """`tubelet train ...` in this process (pipeline/cli.py's parser and exit codes)."""
    return main(["train", *argv])


def kill_rank_after(run: Path, rank: int, step: int, killed: list[int]) -> threading.Thread:
    """Once metrics.jsonl reaches `step`, SIGKILL the process of `rank` (from RUN/workers)."""
    def watch() -> None:
        metrics, record = run / "metrics.jsonl", run / "workers" / f"rank{rank}.json"
        deadline = time.time() + 240
        while time.time() < deadline:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if lines and json.loads(lines[-1])["step"] >= step and record.exists():
                pid = json.loads(record.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def scenario(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    latents = write_latents(root / "latents")
    torch.set_num_threads(1)
    ref = load_config(TrainConfig, CONFIGS / "debug.yaml", [*SETS, "steps=28"])
    train(ref, latents, root / "reference")

    run, killed = root / "run", []
    base = ["--data", str(latents), "--output", str(run), "--config", str(CONFIGS / "debug.yaml")]
    sets = [a for s in SETS for a in ("--set", s)]
    watcher = kill_rank_after(run, rank=1, step=10, killed=killed)
    first = tubelet_train(*base, *sets, "--set", "steps=24", "--workers", "2")
    watcher.join(timeout=1)
    after_kill = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    refused = tubelet_train(*base, *sets, "--set", "steps=28")  # occupied, no --resume
    # resumed with the other loader (data.loader: worker reads the plan in the Train worker)
    second = tubelet_train(*base, *sets, "--set", "steps=28", "--workers", "1", "--resume",
                           "--set", "data.loader=worker")
    return {"root": root, "run": run, "killed": killed, "codes": (first, refused, second),
            "after_kill": after_kill}


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp_workers_match_one_process(scenario):
    ref = metrics(scenario["root"] / "reference")
    got = metrics(scenario["run"])
    for a, b in zip(ref[:8], got[:8], strict=True):
        assert a["step"] == b["step"] and a["bucket"] == b["bucket"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_killed_worker_is_survived_with_a_final_checkpoint(scenario):
    run = scenario["run"]
    first, _, _ = scenario["codes"]
    assert first == 0 and len(scenario["killed"]) == 1
    assert scenario["after_kill"]["step"] == 24  # the first run finished despite the kill
    restarted = json.loads((run / "workers" / "rank0.json").read_text())["pid"]
    assert restarted not in scenario["killed"]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert "step_00000024" in ckpts and len(ckpts) <= 2  # keep_checkpoints: 2


def test_resume_continues_exactly(scenario):
    run = scenario["run"]
    _, refused, second = scenario["codes"]
    assert refused == 2 and second == 0
    assert [m["step"] for m in metrics(run)] == list(range(1, 29))  # each step once
    ref, got = weights(scenario["root"] / "reference"), weights(run)
    # 2 workers -> killed -> restarted -> resumed on 1 worker that reads its own plan: the
    # straight run's weights.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)
    assert (run / "loss.png").stat().st_size > 1000
    record = json.loads((run / "run.json").read_text())
    assert record["steps"] == 28 and record["buckets"] == {"a-9f": 5, "b-5f": 3, "c-9f": 2}
    assert (run / "checkpoints" / "step_00000028" / "config.yaml").is_file()


def test_input_streams_videos_into_training_through_killed_actors(ray_cluster, tmp_path):
    """--input: decode + VAE actors feed the trainer, no latent dataset is written; a busy
    decode actor, then a busy VAE encode actor, SIGKILLed mid-run: Ray Data restarts them and
    retries their batches, and training runs every step exactly once."""
    from models.export import load_exported
    from pipeline.synth import SynthConfig, synthesize
    from tests.faults import Killer

    synthesize(SynthConfig(num_videos=8, seed=4, workers=1), tmp_path / "videos")
    cfg = load_config(TrainConfig, CONFIGS / "debug.yaml",
                      [*SETS, "steps=8", "data.batch_size=2", "worker.num_cpus=0.3",
                       "preprocess.decode.batch_size=1", "preprocess.encode.batch_size=1"])
    with Killer([("DecodeStage", lambda: True), ("VAEEncodeStage", lambda: True)]) as killer:
        summary = run_train(cfg, tmp_path / "run", input_src=str(tmp_path / "videos"))
    assert sorted(killer.killed) == ["DecodeStage", "VAEEncodeStage"], killer.killed
    rows = metrics(tmp_path / "run")
    assert summary["steps"] == 8 and [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["samples"] >= 1 and r["loss"] > 0 for r in rows)
    assert not list((tmp_path / "run").rglob("*.parquet"))  # nothing materialised
    dit, _, config = load_exported(tmp_path / "run" / "export")
    assert config["step"] == 8 and dit.config.in_channels == 4
    # The recorded config is the one the run used: the shipped `auto` pools sized for this
    # machine, as every command sizes them (pipeline/pools.py), and loads back with --config.
    from pipeline.pools import sized, train_workers
    from pipeline.streams import latent_stages

    recorded = load_config(TrainConfig, tmp_path / "run" / "export" / "train.yaml")
    assert recorded == sized("train", cfg, lambda c: latent_stages(c.preprocess, None), None,
                             [train_workers(cfg)])
    assert isinstance(recorded.preprocess.decode.max_actors, int)


def test_preprocess_then_train_with_the_shipped_defaults(ray_cluster, tmp_path, capsys):
    """`tubelet preprocess` then `tubelet train` with every default (only fewer steps): the
    model takes the 16 channels of the shipped VAE's latents from the dataset."""
    from models.export import load_exported
    from pipeline.synth import SynthConfig, synthesize

    synthesize(SynthConfig(num_videos=3, seed=4, workers=1, max_seconds=1.5), tmp_path / "v")
    pre, run = tmp_path / "pre", tmp_path / "run"
    assert main(["preprocess", "--input", str(tmp_path / "v"), "--output", str(pre)]) == 0
    assert main(["train", "--data", str(pre / "latents"), "--output", str(run),
                 "--set", "steps=2"]) == 0, capsys.readouterr().err
    assert [m["step"] for m in metrics(run)] == [1, 2]
    dit, _, config = load_exported(run / "export")
    assert dit.config.in_channels == 16 and config["step"] == 2
    resolved = load_config(TrainConfig, run / "config.yaml")  # the run records what it used
    assert resolved.model.in_channels == 16


def test_a_node_removed_mid_run_is_survived_exactly(tmp_path):
    """2 FSDP workers on two nodes of a ray.cluster_utils.Cluster (head without CPUs, three
    1-CPU nodes): after step 8 the node of rank 1 is removed (raylet and workers killed). Ray
    Train restarts the group from the last checkpoint on the nodes left; every step is logged
    once and the run ends at a one-process run's weights."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.faults import parent_pid, raylet_pid

    if ray.is_initialized():
        ray.shutdown()
    latents = write_latents(tmp_path / "latents")
    sets = [*SETS, "steps=24", "worker.num_cpus=0.6", "data.loader=worker", "num_workers=2"]
    torch.set_num_threads(1)
    train(load_config(TrainConfig, CONFIGS / "debug.yaml", sets), latents, tmp_path / "ref")
    store = 150 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": store, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(3)]
    run, removed, seen = tmp_path / "run", [], []

    def remove_rank1_node() -> None:
        deadline = time.time() + 300
        record = run / "workers" / "rank1.json"
        while time.time() < deadline and not removed:
            try:  # metrics.jsonl may end in a line being written; the worker may be gone
                step = metrics(run)[-1]["step"] if (run / "metrics.jsonl").exists() else 0
                pid = json.loads(record.read_text())["pid"] if record.exists() else None
            except (ValueError, IndexError, OSError):
                step, pid = 0, None
            parent = parent_pid(pid) if step >= 8 and pid else None
            if parent is not None:
                raylets = {raylet_pid(n): n for n in nodes}
                if parent in raylets:
                    removed.append(pid)
                    cluster.remove_node(raylets[parent], allow_graceful=False)
                    return
                seen.append((parent, sorted(raylets)))
            time.sleep(0.05)

    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        watcher = threading.Thread(target=remove_rank1_node, daemon=True)
        watcher.start()
        cfg = load_config(TrainConfig, CONFIGS / "debug.yaml", sets)
        summary = run_train(cfg, run, data=str(latents), address=cluster.address)
        watcher.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, f"rank 1's node was not found to remove {seen[-3:]}"
    assert json.loads((run / "workers" / "rank1.json").read_text())["pid"] != removed[0]
    assert summary["steps"] == 24
    assert [m["step"] for m in metrics(run)] == list(range(1, 25))  # each step once
    ref, got = weights(tmp_path / "ref"), weights(run)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5, msg=k)
