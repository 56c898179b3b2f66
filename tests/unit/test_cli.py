"""The `tubelet` CLI: --help everywhere, one-line config errors, a run record per run."""

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import build_parser, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_on_every_subcommand():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "synth" in commands
    for name in commands:
        res = run_cli(name, "--help")
        assert res.returncode == 0, res.stderr
        assert "--config" in res.stdout and "--set" in res.stdout


@pytest.mark.parametrize("assignment, needle", [
    ("num_vidoes=3", "unknown key 'num_vidoes'"),
    ("crf=high", "key 'crf': expected int"),
    ("fps=[0]", "fps: must be positive"),
])
def test_bad_set_exits_nonzero_with_one_line(tmp_path, assignment, needle):
    res = run_cli("synth", "--output", str(tmp_path), "--set", assignment)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not list(tmp_path.glob("*.mp4"))


def test_synth_writes_resolved_config_that_loads_back(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["synth", "--output", str(out), "--num-videos", "3", "--set", "seed=9",
                 "--set", "max_seconds=1.2"]) == 0
    assert len(list(out.glob("*.mp4"))) == 3
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["num_videos"] == 3 and resolved["seed"] == 9
    record = json.loads((out / "run.json").read_text())
    assert record["versions"]["av"] != "not installed" and record["videos"] == 3
    # The resolved config reproduces the run.
    again = tmp_path / "again"
    assert main(["synth", "--output", str(again), "--config", str(out / "config.yaml")]) == 0
    assert (again / "captions.jsonl").read_text() == (out / "captions.jsonl").read_text()
