"""A DiT export records the VAE its training latents came from and that VAE's latent
normalisation; generation decodes with it and refuses a VAE that scales latents otherwise
(wrong colours, no error, is what decoding with another scaling gives)."""

import json

import pytest

from actors.common.vae import VAEStageConfig
from pipeline.config import ConfigError
from pipeline.generate import inspect_model
from pipeline.train import data_vae, latents_record
from tests.exports import write_export, write_vae

PER_CHANNEL = {"scaling_factor": (0.5, 1.0, 2.0, 4.0), "shift_factor": (0.1, 0.0, -0.1, 0.2)}


def test_the_record_names_the_vae_and_its_normalisation(tmp_path):
    vae = str(write_vae(tmp_path / "vae.safetensors", **PER_CHANNEL))
    record = latents_record(vae)
    assert record.vae == vae
    assert record.scaling_factor == list(PER_CHANNEL["scaling_factor"])
    assert record.shift_factor == list(PER_CHANNEL["shift_factor"])
    scalar = latents_record(str(write_vae(tmp_path / "scalar.safetensors")))
    assert (scalar.scaling_factor, scalar.shift_factor) == ([1.0], [0.0])
    unknown = latents_record("")  # a random-init VAE: nothing to record
    assert (unknown.vae, unknown.scaling_factor, unknown.shift_factor) == ("", [], [])
    # a latent dataset names its VAE and the normalisation it encoded with in the preprocess
    # record beside it; that record wins over the file (refitted since, say)
    (tmp_path / "pre" / "latents").mkdir(parents=True)
    then = {"scaling_factor": [0.25], "shift_factor": [0.5]}
    (tmp_path / "pre" / "run.json").write_text(json.dumps({"vae": vae,
                                                           "vae_normalisation": then}))
    assert data_vae(tmp_path / "pre" / "latents") == (vae, then)
    assert latents_record(*data_vae(tmp_path / "pre" / "latents")).scaling_factor == [0.25]
    assert data_vae(tmp_path / "elsewhere") == ("", None)


def test_generate_decodes_with_the_recorded_vae_and_refuses_another_scaling(tmp_path):
    vae = write_vae(tmp_path / "vae.safetensors", **PER_CHANNEL)
    export = write_export(tmp_path / "dit", latents={
        "vae": str(vae), "scaling_factor": list(PER_CHANNEL["scaling_factor"]),
        "shift_factor": list(PER_CHANNEL["shift_factor"])})
    assert inspect_model(export, VAEStageConfig(checkpoint="auto")).vae == str(vae)
    assert inspect_model(export, VAEStageConfig(checkpoint=str(vae))).vae == str(vae)
    other = write_vae(tmp_path / "other.safetensors", scaling_factor=0.7)  # same weights
    with pytest.raises(ConfigError, match="normalises latents otherwise") as e:
        inspect_model(export, VAEStageConfig(checkpoint=str(other)))
    assert str(other) in str(e.value) and str(vae) in str(e.value)
    # the same channel count, other values: refused too
    shifted = write_vae(tmp_path / "shifted.safetensors", scaling_factor=(0.5, 1.0, 2.0, 4.0),
                        shift_factor=(0.1, 0.0, -0.1, 0.3))
    with pytest.raises(ConfigError, match="normalises latents otherwise"):
        inspect_model(export, VAEStageConfig(checkpoint=str(shifted)))
    # an export from before the record: not checked
    old = write_export(tmp_path / "old")
    assert inspect_model(old, VAEStageConfig(checkpoint=str(other))).vae == str(other)
