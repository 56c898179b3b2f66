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


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


@pytest.mark.parametrize("flag", [["--vae", "missing.safetensors"],
                                  ["--set", "vae.checkpoint=missing.safetensors"]])
def test_preprocess_vae_flag_is_the_config_key(tmp_path, capsys, flag):
    """`--vae X` is `--set vae.checkpoint=X`: the same refusal, before Ray starts."""
    code = main(["preprocess", "--input", str(tmp_path), "--output", str(tmp_path / "o"), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "VAE checkpoint missing.safetensors not found" in err[0]


def test_exit_codes_bad_input_2_failed_training_1(monkeypatch, tmp_path, capsys):
    from pipeline import cli
    from pipeline.ray_train import TrainError, TrainFailed
    from pipeline.sources import SourceError

    def raising(error):
        def run(args):
            raise error
        return run

    for error, code in ((TrainError("occupied"), 2), (SourceError("no videos"), 2),
                        (TrainFailed("gave up"), 1)):
        monkeypatch.setitem(cli.COMMANDS, "synth", (cli.add_synth, raising(error)))
        assert main(["synth", "--output", str(tmp_path)]) == code
        assert capsys.readouterr().err.strip() == f"tubelet synth: {error}"
    monkeypatch.setitem(cli.COMMANDS, "synth", (cli.add_synth, raising(RuntimeError("bug"))))
    with pytest.raises(RuntimeError, match="bug"):  # a bug is a traceback, not an exit code
        main(["synth", "--output", str(tmp_path)])
