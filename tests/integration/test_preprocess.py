"""`tubelet preprocess` on a real local Ray: latents, errors table, resume, kill -9, bad input."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from pipeline.config import load_config
from pipeline.preprocess import run_preprocess
from pipeline.streams import PreprocessConfig
from pipeline.synth import SynthConfig, synthesize
from tests.badfiles import bad_inputs
from tests.faults import Killer
from tests.hostile import build_corpus

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/preprocess/default.yaml"


def small_config(*overrides: str) -> PreprocessConfig:
    return load_config(PreprocessConfig, CONFIG, ["ray.object_store_mb=300", *overrides])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rows = synthesize(SynthConfig(num_videos=10, seed=5, workers=2), root / "good")
    bad = bad_inputs(root / "bad")
    # A manifest names every input, including the two a folder scan cannot list.
    manifest = [{"path": f"good/{r['path']}", "caption": r["caption"]} for r in rows]
    manifest += [{"path": str(p)} for p in bad.values()]
    (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return root, bad


@pytest.fixture(scope="module")
def first_run(videos, ray_local, tmp_path_factory):
    root, _ = videos
    out = tmp_path_factory.mktemp("pre")
    summary = run_preprocess(small_config(), str(root / "manifest.jsonl"), out, progress=False)
    return out, summary


def read_latents(out: Path) -> pa.Table:
    return pds.dataset(out / "latents", format="parquet").to_table()


def test_latent_dataset_follows_the_contract(videos, first_run):
    root, _ = videos
    out, summary = first_run
    table = read_latents(out)
    for col in ("id", "path", "caption", "bucket", "fps", "num_frames", "height", "width",
                "latent", "latent_shape"):
        assert col in table.column_names
    assert table.num_rows == summary["clips_written"] > 0
    assert len(set(table.column("id").to_pylist())) == table.num_rows
    captions = {json.loads(line)["path"]: json.loads(line)["caption"]
                for line in (root / "good/captions.jsonl").read_text().splitlines()}
    good_paths = {str((root / "good" / p).resolve()) for p in captions}
    assert set(table.column("path").to_pylist()) == good_paths  # every good video made it
    for row in table.to_pylist():
        c, t, h, w = row["latent_shape"]
        assert (t, h, w) == (1 + (row["num_frames"] - 1) // 4, row["height"] // 8,
                             row["width"] // 8)
        latent = np.asarray(row["latent"], np.float32)
        assert latent.size == c * t * h * w and np.isfinite(latent).all() and latent.std() > 0
        assert row["caption"] == captions[Path(row["path"]).name]
        assert row["bucket"].endswith(f"-{row['num_frames']}f")
    # one shape per bucket
    shapes = {}
    for row in table.select(["bucket", "latent_shape"]).to_pylist():
        shapes.setdefault(row["bucket"], set()).add(tuple(row["latent_shape"]))
    assert all(len(s) == 1 for s in shapes.values())


def test_plain_pyarrow_reads_latents_with_ray_imported(first_run):
    import ray.data  # noqa: F401 - docs/design.md: Ray's extension types once broke this read

    out, _ = first_run
    table = read_latents(out)
    assert pa.types.is_list(table.schema.field("latent").type)


def test_every_bad_input_is_one_error_row(videos, first_run):
    _, bad = videos
    out, summary = first_run
    errors = pds.dataset(out / "errors", format="parquet").to_table().to_pylist()
    by_path = {}
    for e in errors:
        by_path.setdefault(e["path"], []).append(e)
    for name, path in bad.items():
        rows = by_path.get(str(Path(path).absolute()), [])
        assert len(rows) == 1, (name, rows)
        assert rows[0]["kind"] == "error" and rows[0]["error"], (name, rows)
    assert summary["errors"] == len(bad)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["clips_written"] == summary["clips_written"]
    assert saved["config"]["buckets"]["target_fps"] == 8


def test_a_hostile_manifest_writes_only_inside_the_output(videos, ray_local, tmp_path):
    """Manifest rows are inputs, never output names: a `../` path to a good video is read (and
    its latents land in DIR/latents under a content name), system files and a directory are
    error rows, a caption with a NUL, newlines and a `../` is kept as data; nothing is written
    outside the output folder."""
    root, _ = videos
    good = sorted((root / "good").glob("*.mp4"))[0]
    work = tmp_path / "work"
    work.mkdir()
    rows = [{"path": f"../../{tmp_path.name}/../{root.name}/good/{good.name}",
             "caption": "../../x\n\u0000 a red circle; rm -rf /"},
            {"path": "/etc/hostname", "caption": "x"}, {"path": "/etc", "caption": "y"},
            {"path": "/dev/zero", "caption": "z"}]
    manifest = work / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p for p in tmp_path.parent.rglob("*")} - set(tmp_path.rglob("*"))
    out = tmp_path / "out"
    summary = run_preprocess(small_config(), str(manifest), out, progress=False)
    after = {p for p in tmp_path.parent.rglob("*")} - set(tmp_path.rglob("*"))
    assert after == before  # nothing new anywhere but under this test's folder
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"work", "out"}
    latents = read_latents(out)
    assert latents.num_rows >= 1
    assert set(latents.column("caption").to_pylist()) == {rows[0]["caption"]}
    assert all(p.name.startswith("part-") for p in (out / "latents").iterdir())
    errors = pds.dataset(out / "errors", format="parquet").to_table().column("path").to_pylist()
    assert sorted(errors) == ["/dev/zero", "/etc", "/etc/hostname"]
    assert summary["errors"] == 3


def test_rerun_resumes_without_duplicates(videos, first_run, tmp_path):
    root, _ = videos
    out, summary = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = run_preprocess(small_config(), str(root / "manifest.jsonl"), copy, progress=False)
    assert again["clips_written"] == 0
    assert again["clips_already_done"] == summary["clips_written"]
    assert read_latents(copy).num_rows == summary["clips_written"]


def test_fused_decode_encode_gives_the_same_dataset(videos, first_run, tmp_path):
    # fuse_decode: one actor decodes and encodes, so no frames enter the object store; the
    # dataset, the error rows and their stages are those of the two-pool graph.
    root, _ = videos
    out, summary = first_run
    fused = tmp_path / "fused"
    got = run_preprocess(small_config("fuse_decode=true"), str(root / "manifest.jsonl"), fused,
                         progress=False)
    assert got["clips_written"] == summary["clips_written"]
    assert (got["errors"], got["by_reason"]) == (summary["errors"], summary["by_reason"])
    a, b = (read_latents(d).sort_by("id") for d in (out, fused))
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for x, y in zip(a.column("latent").to_pylist(), b.column("latent").to_pylist(), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   atol=2e-2)  # float16 storage; batches may group differently
    assert sum(got["decode_nodes"].values()) == got["clips_written"]

    def error_stages(d: Path) -> list[tuple[str, str]]:
        rows = pds.dataset(d / "errors", format="parquet").to_table().to_pylist()
        return sorted((e["path"], e["stage"]) for e in rows)

    assert error_stages(fused) == error_stages(out)


def one_clip_per_write(videos: Path, target: Path) -> list[str]:
    """`tubelet preprocess` as a subprocess that writes one latent file per clip (so a test can
    act between the first files and the end)."""
    return [sys.executable, "-m", "pipeline", "preprocess", "--input", str(videos),
            "--output", str(target), "--set", "ray.num_cpus=2", "--set", "write.batch_size=1",
            "--set", "encode.batch_size=1", "--set", "ray.object_store_mb=300"]


def test_kill_9_then_rerun_gives_every_clip_once(videos, first_run, tmp_path):
    root, _ = videos
    out, summary = first_run
    target = tmp_path / "killed"
    cmd = one_clip_per_write(root / "good", target)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((target / "latents").glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    partial = len(list((target / "latents").glob("part-*.parquet")))
    assert 0 < partial
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = read_latents(target).column("id").to_pylist()
    expected = read_latents(out).column("id").to_pylist()
    assert len(ids) == len(set(ids))  # exactly once
    assert sorted(ids) == sorted(expected)


def test_output_gone_unwritable_mid_job_stops_cleanly_and_rerun_resumes(videos, first_run,
                                                                       tmp_path):
    """The latents folder becomes unwritable mid-job (swapped for a link into sysfs, where the
    kernel refuses every new file, root or not): the job stops with one line saying so and
    exit 1, leaves no temp file, every file it wrote is whole; once the folder is back, the
    same command finishes the job with every clip exactly once."""
    root, _ = videos
    out, _ = first_run
    target = tmp_path / "unwritable"
    cmd = one_clip_per_write(root / "good", target)
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latents, kept = target / "latents", target / "latents.kept"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(latents.glob("part-*.parquet"))) >= 2:
            latents.rename(kept)
            latents.symlink_to("/sys/kernel", target_is_directory=True)
            break
        time.sleep(0.1)
    assert kept.exists(), "the run finished before its output could be taken away"
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    # our one line (Ray Data may add its own failure report around it)
    ours = [ln for ln in stderr.splitlines() if ln.startswith("tubelet preprocess: stopped")]
    assert len(ours) == 1, stderr[-3000:]
    assert "its output cannot be written" in ours[0] and "latents" in ours[0], ours
    assert "Permission denied" in ours[0] or "not permitted" in ours[0], ours
    assert not [p for p in kept.iterdir() if "tmp" in p.name]  # no half-written file
    written = list(kept.glob("part-*.parquet"))
    assert written and all(pds.dataset(f).count_rows() >= 1 for f in written)  # each whole
    latents.unlink()
    kept.rename(latents)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = read_latents(target).column("id").to_pylist()
    assert len(ids) == len(set(ids))  # exactly once
    assert sorted(ids) == sorted(read_latents(out).column("id").to_pylist())


def test_a_full_disk_mid_job_stops_cleanly_and_rerun_resumes(videos, first_run, tmp_path):
    """A real ENOSPC: the latents folder is a 64 KiB tmpfs, mounted in a user + mount namespace
    (`unshare -rm`: no privilege needed where unprivileged user namespaces are allowed; skipped
    where they are not). The job fills it, stops with one line naming the full disk and exit 1,
    leaves no temp file and only whole files; the rerun, with room again, gives every clip once."""
    mount = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {tmp_path}"]
    probe = subprocess.run(mount, capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unprivileged user + mount namespace (unshare -rm) to mount a tmpfs in")
    root, _ = videos
    out, _ = first_run
    target, kept = tmp_path / "full", tmp_path / "kept"
    latents = target / "latents"
    latents.mkdir(parents=True)
    kept.mkdir()
    cmd = one_clip_per_write(root / "good", target)
    script = (f"mount -t tmpfs -o size=64k tmpfs {latents} || exit 99; "
              f"{shlex.join(cmd)} 2> {tmp_path / 'stderr'}; echo $? > {tmp_path / 'rc'}; "
              f"ls -a {latents} > {tmp_path / 'listing'}; "
              f"for f in {latents}/part-*.parquet; do [ -e \"$f\" ] && cp \"$f\" {kept}/; done; "
              "true")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, timeout=400)
    assert done.returncode == 0, done
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", stderr[-3000:]
    ours = [ln for ln in stderr.splitlines() if ln.startswith("tubelet preprocess: stopped")]
    assert len(ours) == 1 and "No space left on device" in ours[0], stderr[-3000:]
    listing = (tmp_path / "listing").read_text().split()
    assert not [n for n in listing if "tmp" in n], listing  # no half-written file
    for f in kept.glob("part-*.parquet"):
        assert pds.dataset(f).count_rows() >= 1  # each whole
    assert not list(latents.iterdir())  # outside the namespace: the folder under the mount
    for f in kept.iterdir():
        shutil.copy(f, latents / f.name)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = read_latents(target).column("id").to_pylist()
    assert len(ids) == len(set(ids))  # exactly once
    assert sorted(ids) == sorted(read_latents(out).column("id").to_pylist())


def test_the_hostile_corpus_through_preprocess(ray_local, tmp_path):
    """tests/hostile.py's corpus as a folder (FIFO, symlink loops and a dangling link
    included: the scan lists them, the probe refuses them without opening): the job ends,
    every supported video is in the latent dataset, every other input is one error row of
    the stage the corpus names, and no clip is there twice. Damaged data ("any": flipped
    bytes) may give clips, decode error rows (one per clip that fails), both, or one probe or
    bucket row (a flipped header: CI saw each)."""
    corpus = build_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    summary = run_preprocess(small_config(), str(tmp_path / "corpus"), out, progress=False)
    latents = read_latents(out).select(["id", "path"]).to_pylist()
    ids = [r["id"] for r in latents]
    assert len(ids) == len(set(ids))
    errors = pds.dataset(out / "errors", format="parquet").to_table().to_pylist()
    stages: dict[str, list[str]] = {}
    for e in errors:
        stages.setdefault(e["path"], []).append(e["stage"])
    clipped = {r["path"] for r in latents}
    assert summary["inputs"] == len(corpus)
    for name, case in corpus.items():
        path = str(case.path.absolute())
        rows = stages.get(path, [])
        if case.expect == "any":  # whatever FFmpeg makes of it, it is accounted for
            assert path in clipped or rows, (name, case.why)
            assert rows in ([], ["probe"], ["bucket"]) or set(rows) == {"decode"}, (name, rows)
            assert not (path in clipped and rows in (["probe"], ["bucket"])), (name, rows)
            continue
        got = "clip" if path in clipped else (rows[0] if rows else "missing")
        assert got == case.expect, (name, case.why, got, rows)
        if got == "decode":  # one row per clip, none decoded
            assert set(rows) == {"decode"}, (name, rows)
        else:  # one row per input
            assert len(rows) == (0 if got == "clip" else 1), (name, rows)


def error_paths(out: Path) -> list[str]:
    return sorted(pds.dataset(out / "errors", format="parquet").to_table().column("path")
                  .to_pylist())


def test_killed_decode_and_encode_actors_lose_nothing(videos, first_run, tmp_path):
    """SIGKILL a busy decode actor, then a busy VAE encode actor, mid-job: Ray Data restarts
    them and retries their batches; the job finishes with every clip and every error row
    exactly once (the same dataset as an undisturbed run)."""
    root, _ = videos
    out, summary = first_run
    target = tmp_path / "faults"
    cfg = small_config("write.batch_size=1", "encode.batch_size=1", "decode.batch_size=1")
    with Killer([("DecodeStage", lambda: True), ("VAEEncodeStage", lambda: True)]
                ) as killer:
        got = run_preprocess(cfg, str(root / "manifest.jsonl"), target, progress=False)
    assert sorted(killer.killed) == ["DecodeStage", "VAEEncodeStage"], killer.killed
    ids = read_latents(target).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == summary["clips_written"] == got["clips_written"]
    assert sorted(ids) == sorted(read_latents(out).column("id").to_pylist())
    assert error_paths(target) == error_paths(out)  # each bad input once, as before


def test_a_killed_fused_decode_encode_actor_loses_nothing(videos, first_run, tmp_path):
    """fuse_decode: one actor decodes and encodes; SIGKILL it mid-job: Ray Data restarts it and
    retries its batch; the job finishes with the same clips and error rows, each once."""
    root, _ = videos
    out, summary = first_run
    target = tmp_path / "fused_faults"
    cfg = small_config("fuse_decode=true", "write.batch_size=1", "encode.batch_size=1",
                       "decode.batch_size=1")
    with Killer([("DecodeEncodeStage", lambda: True)]) as killer:
        got = run_preprocess(cfg, str(root / "manifest.jsonl"), target, progress=False)
    assert killer.kills == 1, killer.killed
    ids = read_latents(target).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == summary["clips_written"] == got["clips_written"]
    assert sorted(ids) == sorted(read_latents(out).column("id").to_pylist())
    assert error_paths(target) == error_paths(out)


def test_a_node_removed_mid_job_loses_nothing(tmp_path):
    """A 3-node ray.cluster_utils.Cluster, decode actors on two nodes: once both decoders
    worked and a latent file exists, the worker node of a busy decoder is removed (its raylet
    and workers killed). Ray restarts its actors on the other nodes and rebuilds lost blocks;
    the job finishes with every clip once (no duplicate ids, and a rerun finds nothing left
    to do), decoded on at least two nodes."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from tests.faults import NodeRemover

    if ray.is_initialized():
        ray.shutdown()
    # Larger, longer videos so decoding outlasts probing and the removal lands mid-job.
    src = tmp_path / "big"
    synthesize(SynthConfig(num_videos=8, seed=2, sizes=[(640, 360)], min_seconds=4.5,
                           max_seconds=5, workers=2), src)
    store = 150 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
    out = tmp_path / "multi"
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        # Both decode actors must be up before work is handed out.
        ray.data.DataContext.get_current().wait_for_min_actors_s = 120
        cfg = small_config("decode.num_cpus=0.4", "decode.min_actors=2", "decode.max_actors=2",
                           "decode.batch_size=1", "decode.max_tasks_in_flight=1",
                           "probe.batch_size=1", "assign.batch_size=1", "encode.num_cpus=0.2",
                           "probe.num_cpus=0.1", "assign.num_cpus=0.05", "write.num_cpus=0.05",
                           "write.batch_size=1", "encode.batch_size=1")
        remover = NodeRemover(cluster, workers, "DecodeStage",
                              lambda: any((out / "latents").glob("part-*.parquet")))
        remover.start()
        summary = run_preprocess(cfg, str(src), out, address=cluster.address, progress=False)
        remover.join(timeout=5)
        removed = remover.removed
        assert removed, "no busy decoder on a worker node was found to remove"
        # Spread out. (Whether the removed node's own clips were written before it went is
        # timing: in loaded full-suite runs its decoder was often still on its first clip,
        # which another node then decoded; the job losing nothing is what this test checks.)
        assert len(summary["decode_nodes"]) >= 2, summary["decode_nodes"]
        ids = read_latents(out).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == summary["clips_written"] > 0
        again = run_preprocess(cfg, str(src), out, address=cluster.address, progress=False)
        assert again["clips_written"] == 0 and again["clips_in_dataset"] == len(ids)
    finally:
        ray.shutdown()
        cluster.shutdown()
