"""Untrusted checkpoints load without running code .

DCP's own loader unpickles `.metadata` and non-tensor items with full pickle; a crafted file
runs what it names. These tests build such payloads (each would create a file when loaded by
plain pickle, shown first) and check that `load_checkpoint` refuses them, names the file and
the object, and runs nothing; and that a real checkpoint still loads exactly."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from actors.workers.checkpoints import (
    EMA,
    UntrustedCheckpointError,
    _state,
    load_checkpoint,
    read_safe_metadata,
    save_checkpoint,
)
from tests.payloads import CreatesFile, payload


def tiny(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optim.step()
    return model, optim, EMA(model, 0.9)


def save(path: Path, train: dict) -> nn.Module:
    model, optim, ema = tiny(0)
    save_checkpoint(path, model, optim, ema, train, {"steps": 1})
    return model


def test_a_real_checkpoint_round_trips(tmp_path):
    saved = save(tmp_path / "ck", {"step": 7, "data_fingerprint": "abc", "world_size": 1})
    model, optim, ema = tiny(1)
    train = load_checkpoint(tmp_path / "ck", model, optim, ema)
    assert train == {"step": 7, "data_fingerprint": "abc", "world_size": 1}
    for a, b in zip(saved.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert optim.state_dict()["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_a_metadata_payload_is_refused_and_runs_nothing(tmp_path):
    save(tmp_path / "ck", {"step": 1, "data_fingerprint": "", "world_size": 1})
    proof = tmp_path / "proof-plain-pickle"
    pickle.loads(payload(proof))
    assert proof.exists()  # the payload is real: plain pickle runs it

    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(payload(marker))
    model, optim, ema = tiny(1)
    with pytest.raises(UntrustedCheckpointError, match=r"\.metadata: refused to load.*open"):
        load_checkpoint(tmp_path / "ck", model, optim, ema)
    assert not marker.exists()


def test_a_payload_inside_the_checkpoint_items_is_refused(tmp_path):
    """Non-tensor items (the train dict) are stored by torch.save: a crafted one is refused."""
    marker = tmp_path / "pwned"
    model, optim, ema = tiny(0)
    train = {"step": 1, "data_fingerprint": CreatesFile(marker), "world_size": 1}
    dcp.save(_state(model, optim, ema, train), checkpoint_id=str(tmp_path / "ck"))
    assert not marker.exists()
    model, optim, ema = tiny(1)
    with pytest.raises(UntrustedCheckpointError, match="train"):
        load_checkpoint(tmp_path / "ck", model, optim, ema)
    assert not marker.exists()


def test_metadata_that_is_not_a_pickle_or_not_metadata_is_one_clear_error(tmp_path):
    bad = tmp_path / ".metadata"
    bad.write_bytes(b"\x80\x05truncated")
    with pytest.raises(UntrustedCheckpointError, match="not a DCP metadata file"):
        read_safe_metadata(bad)
    bad.write_bytes(pickle.dumps({"step": 1}))
    with pytest.raises(UntrustedCheckpointError, match="holds a dict"):
        read_safe_metadata(bad)


def test_a_pickle_named_model_safetensors_is_refused_by_generate_and_runs_nothing(tmp_path):
    """A downloaded "export" whose weights file is a pickle payload: generate refuses it in
    one line before Ray starts, and `load_exported` refuses it too; the payload never runs."""
    import subprocess
    import sys

    from models.export import load_exported
    from tests.exports import write_export, write_vae

    export = write_export(tmp_path / "export")
    marker = tmp_path / "pwned"
    (export / "model.safetensors").write_bytes(payload(marker))
    vae = write_vae(tmp_path / "vae.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving right\n")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "generate", "--checkpoint", str(export), "--prompts",
         str(prompts), "--output", str(tmp_path / "gen"), "--vae", str(vae), "--height", "32",
         "--width", "32", "--frames", "5"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a safetensors file" in lines[0], res.stderr
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        load_exported(export)
    assert not marker.exists()


def test_a_pickle_named_as_vae_weights_is_refused_and_runs_nothing(tmp_path):
    from actors.common.vae import VAELoadError, load_checkpoint_vae

    marker = tmp_path / "pwned"
    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(payload(marker))
    with pytest.raises(VAELoadError, match="is not a tubelet VAE checkpoint"):
        load_checkpoint_vae(str(weights))
    torch.save({"x": CreatesFile(marker)}, tmp_path / "vae.pt")  # torch's pickle format too
    with pytest.raises(VAELoadError):
        load_checkpoint_vae(str(tmp_path / "vae.pt"))
    assert not marker.exists()
