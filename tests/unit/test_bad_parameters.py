"""Impossible parameters fail fast: every command, with one stderr line naming the
flag or key, exit code 2, before any Ray work starts (no `[ray]` line, no output written).

Table-driven: each row is a command line with one impossible value and the words its error
must contain. Inputs are valid-looking so the value under test is what gets refused."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """An empty videos folder, a prompt file, the base of the output folders (none exists)."""
    base = tmp_path_factory.mktemp("bad-params")
    videos = base / "videos"
    videos.mkdir()
    prompts = base / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle moving right"}) + "\n")
    return {"videos": videos, "prompts": prompts, "base": base}


CASES = [
    # (command line with {videos} {prompts} {out} {dit}, words the one error line contains)
    ("synth --output {out} --num-videos -3", "num_videos"),
    ("synth --output {out} --set fps=[0]", "fps"),
    ("preprocess --input {videos} --output {out} --set buckets.target_fps=0", "target_fps"),
    ("preprocess --input {videos} --output {out} --set buckets.resolutions=[]", "resolutions"),
    ("preprocess --input {videos} --output {out} --set buckets.max_clips_per_video=0",
     "max_clips_per_video"),
    ("preprocess --input {videos} --output {out} --set decode.max_actors=0", "max_actors"),
    ("preprocess --input {videos} --output {out} --set decode.num_cpus=-1", "num_cpus"),
    ("preprocess --input {videos} --output {out} --set decode_budget.seconds=-1",
     "decode_budget.seconds"),
    ("train --data {videos} --output {out} --workers 0", "num_workers"),
    ("train --data {videos} --output {out} --set steps=-5", "steps"),
    ("train --data {videos} --output {out} --set data.batch_size=0", "batch_size"),
    ("train --data {videos} --output {out} --set optim.lr=-1", "lr"),
    ("train --data {videos} --output {out} --set model.depth=0", "depth"),
    ("train --data {videos} --output {out} --workers 64", "num_workers=64"),
    ("train --data {videos} --output {out} --set worker.num_gpus=64", "worker.num_gpus"),
    ("preprocess --input {videos} --output {out} --set decode.num_gpus=64", "decode.num_gpus"),
    ("preprocess --input {videos} --output {out} --set decode.min_actors=64", "decode: 64"),
    ("preprocess --input {videos} --output {out} --set max_side=64", "max_side"),
    ("preprocess --input {videos} --output {out} --set decode_budget.frames=5",
     "decode_budget.frames"),
    ("preprocess --input {videos} --output {out} --set decode_budget.pixels=100",
     "decode_budget.pixels"),
    ("train-vae --input {videos} --output {out} --set steps=0", "steps"),
    ("train-vae --input {videos} --output {out} --workers 64", "worker: 64"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --frames -4", "frames"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --steps 0", "steps"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --height 7", "height"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --sequence-parallel 0",
     "sequence_parallel"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --sequence-parallel 5000",
     "sequence_parallel=5000"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --sequence-parallel 16",
     "sampler ranks"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --cache "
     "--set sampler.cache.threshold=-1", "sampler.cache.threshold"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --set pix_fmt=rgb48le",
     "pix_fmt"),
    ("generate --checkpoint {dit} --prompts {prompts} --output {out} --set codec=h999",
     "codec"),
    ("eval --videos {videos} --output {out} --set fps=-1", "fps"),
    # an output folder nobody may write (sysfs refuses new files, root or not)
    ("synth --output /sys/kernel/tubelet-out --num-videos 2", "not writable"),
    ("preprocess --input {videos} --output /sys/kernel/tubelet-out", "not writable"),
    ("train --data {videos} --output /sys/kernel/tubelet-out", "not writable"),
    ("generate --checkpoint {dit} --prompts {prompts} --output /sys/kernel/tubelet-out",
     "not writable"),
    ("eval-vae --input {videos} --output {out} --set max_videos=-1", "max_videos"),
]


def command(line: str, inputs: dict[str, Path], index: int) -> list[str]:
    out = inputs["base"] / f"out{index}"  # its own output folder, which must stay empty
    return line.format(dit=ROOT / "weights" / "dit-demo", out=out, videos=inputs["videos"],
                       prompts=inputs["prompts"]).split()


@dataclass
class Refusal:
    returncode: int
    stdout: str
    stderr: str


def refuse(argv: list[str]) -> Refusal:
    """`tubelet ARGV` through the CLI's own `main`, in this process: the refusals happen before
    Ray and before any heavy work, so one interpreter (one torch import) serves every row; a
    separate process per row spent ~2.5 s each importing torch. tests/unit/test_cli.py runs
    the installed command in its own process."""
    import ray

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = e.code if isinstance(e.code, int) else 1
    if ray.is_initialized():  # a row that got past its check: fail it, leave no Ray behind
        ray.shutdown()
    return Refusal(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def refusals(inputs) -> list[Refusal]:
    return [refuse(command(line, inputs, i)) for i, (line, _) in enumerate(CASES)]


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[c[0].split(" --set ")[-1] if "--set" in c[0]
                              else c[0].split(" ")[0] + " " + c[0].split(" ")[-2]
                              for c in CASES])
def test_impossible_value_fails_fast_with_one_line(inputs, refusals, index):
    needle, res = CASES[index][1], refusals[index]
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "[ray]" not in res.stdout  # refused before Ray started
    out = inputs["base"] / f"out{index}"
    assert not out.exists() or not any(out.iterdir())
