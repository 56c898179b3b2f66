"""A diffusers video-VAE folder wherever a VAE is loaded (actors/common/vae.py): the loader, the
encode and decode stages on tables, `generate`'s model check and the one-line refusals.

The VAEs are tiny random diffusers models saved with `save_pretrained` (the configs of
tests/unit/test_vae_adapters.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.common.buckets import BucketConfig
from actors.common.tensors import pack, unpack
from actors.common.vae import VAELoadError, VAEStageConfig, load_checkpoint_vae, resolve_checkpoint
from actors.common.video import frames_to_video, to_uint8
from actors.decode import DecodeStage
from actors.vae_decode import VAEDecodeStage
from actors.vae_encode import VAEEncodeStage
from models.vae_adapters import SUPPORTED, DiffusersVideoVAE
from tests.stages.test_decode import plan_rows
from tests.unit.test_vae_adapters import tiny_cogvideox, tiny_hunyuan, tiny_wan

BUCKETS = BucketConfig(target_fps=8.0)


def save(build, folder):
    torch.manual_seed(0)
    build().eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save(tiny_wan, tmp_path_factory.mktemp("wan") / "vae")


@pytest.fixture(scope="module")
def clips(dataset) -> pa.Table:
    """Two decoded clips of different buckets (a 2.35:1 and a 16:9 video)."""
    root, rows = dataset
    return DecodeStage(threads=1)(pa.Table.from_pylist(plan_rows(root, rows[:2])))


def frames_of(table: pa.Table, i: int) -> np.ndarray:
    return unpack(table, "frames", np.uint8)[i]


@pytest.mark.parametrize("build", [tiny_wan, tiny_cogvideox, tiny_hunyuan])
def test_a_folder_loads_as_the_adapter_with_its_factors(build, tmp_path):
    save(build, tmp_path / "pipe" / "vae")  # a pipeline layout: the VAE in vae/
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        model = load_checkpoint_vae(str(folder))
        assert isinstance(model, DiffusersVideoVAE) and model.kind == build().__class__.__name__
        assert (model.latent_channels, model.temporal_factor, model.spatial_factor) == (4, 4, 8)
        assert resolve_checkpoint(str(folder)) == str(folder.resolve())


def test_encode_stage_writes_the_adapters_latents(wan_dir, clips):
    out = VAEEncodeStage(VAEStageConfig(checkpoint=str(wan_dir)), BUCKETS,
                         latent_dtype="float32")(clips)
    assert out.column("id").to_pylist() == clips.column("id").to_pylist()
    vae = load_checkpoint_vae(str(wan_dir))
    for i, row in enumerate(out.to_pylist()):
        shape = vae.latent_shape(row["num_frames"], row["height"], row["width"])
        assert tuple(row["latent_shape"]) == shape
        assert len(row["latent"]) == math.prod(shape)
        z = vae.encode(frames_to_video([frames_of(clips, i)]))[0].numpy()  # the model alone
        np.testing.assert_allclose(np.array(row["latent"], np.float32).reshape(shape), z,
                                   atol=1e-5)


def test_tiled_encode_and_decode_stages_round_trip_through_a_folder(wan_dir, clips):
    cfg = VAEStageConfig(checkpoint=str(wan_dir), tile_px=32)
    latents = VAEEncodeStage(cfg, BUCKETS, latent_dtype="float32")(clips.slice(0, 1))
    shape = latents.column("latent_shape")[0].as_py()
    z = np.array(latents.column("latent")[0].as_py(), np.float32).reshape(shape)
    table = pa.table({"id": ["v"], **pack("latent", [z])})  # as the DiT sampler hands it on
    out = VAEDecodeStage(VAEStageConfig(checkpoint=str(wan_dir)), chunk_frames=4)(table)
    assert "latent" not in out.column_names and out.num_rows == 1
    video = unpack(out, "video", np.uint8)[0]
    assert video.shape == frames_of(clips, 0).shape  # (T, H, W, 3): the clip's own size
    vae = load_checkpoint_vae(str(wan_dir))
    expected = to_uint8(vae.decode(torch.from_numpy(z)[None]))[0].numpy()  # untiled
    assert np.abs(video.astype(int) - expected).max() <= 1


def test_generate_checks_a_folders_channels_and_factors(wan_dir, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.generate import inspect_model
    from tests.exports import write_export

    model = inspect_model(write_export(tmp_path / "e4"), VAEStageConfig(checkpoint=str(wan_dir)))
    assert (model.temporal, model.spatial) == (4, 8)
    with pytest.raises(ConfigError, match="4-channel latents but the DiT"):
        inspect_model(write_export(tmp_path / "e16", in_channels=16),
                      VAEStageConfig(checkpoint=str(wan_dir)))


def test_folders_that_are_not_a_supported_vae_are_one_line(tmp_path, wan_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    image_vae = tmp_path / "image-vae"
    image_vae.mkdir()
    (image_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("not json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((wan_dir / "config.json").read_text())
    for folder, needle in ((empty, "holds no diffusers VAE"), (image_vae, "'AutoencoderKL'"),
                           (junk, "not JSON")):
        with pytest.raises(VAELoadError) as e:
            resolve_checkpoint(str(folder))  # refused before a job starts (preprocess)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and str(folder) in msg and needle in msg, msg
        assert all(name in msg for name in SUPPORTED) and ".safetensors" in msg, msg
        with pytest.raises(VAELoadError, match=needle):
            VAEEncodeStage(VAEStageConfig(checkpoint=str(folder)), BUCKETS)
    with pytest.raises(VAELoadError) as e:
        load_checkpoint_vae(str(no_weights))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "could not be loaded" in msg and str(no_weights) in msg


def test_cli_refuses_a_non_vae_folder_in_one_line_before_ray(tmp_path, capsys):
    from pipeline.cli import main

    folder = tmp_path / "not-a-vae"
    folder.mkdir()
    videos = tmp_path / "videos"
    videos.mkdir()
    for argv in (["preprocess", "--input", str(videos), "--output", str(tmp_path / "o")],
                 ["eval-vae", "--input", str(videos)]):
        assert main([*argv, "--vae", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no diffusers VAE" in err[0] and str(folder) in err[0]


def test_train_input_takes_its_channels_from_a_folder(wan_dir):
    from pipeline.streams import latent_channels

    assert latent_channels(VAEStageConfig(checkpoint=str(wan_dir))) == 4  # train --input


@pytest.mark.parametrize("build", [tiny_cogvideox, tiny_hunyuan])
def test_decode_stage_takes_the_other_folders_too(build, tmp_path):
    folder = save(build, tmp_path / "vae")
    z = torch.randn(4, 3, 4, 6, generator=torch.Generator().manual_seed(0)).numpy()
    # The stage's default chunk_frames (16 > 9 frames): HunyuanVideo's time tiles blend over an
    # overlap (diffusers' tiling, not our exact causal cache), so shorter chunks change its frames.
    out = VAEDecodeStage(VAEStageConfig(checkpoint=str(folder)))(
        pa.table({"id": ["v"], **pack("latent", [z])}))
    video = unpack(out, "video", np.uint8)[0]
    expected = to_uint8(load_checkpoint_vae(str(folder)).decode(torch.from_numpy(z)[None]))
    assert video.shape == (9, 32, 48, 3)  # 1 + 4 (T' - 1) frames, 8x the latent's size
    assert np.abs(video.astype(int) - expected[0].numpy()).max() <= 1
