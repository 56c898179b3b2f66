"""diffusers video VAEs behind our interface: tiny random models saved and loaded locally."""

from __future__ import annotations

import json

import pytest
import torch

from models.vae import VideoAutoencoder
from models.vae_adapters import DiffusersVideoVAE, load_diffusers_vae

diffusers = pytest.importorskip("diffusers")


def tiny_wan() -> torch.nn.Module:
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[2.0, 1.0, 0.5, 1.0],
    )  # fmt: skip


def tiny_cogvideox() -> torch.nn.Module:
    return diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.7,
    )  # fmt: skip


def tiny_hunyuan() -> torch.nn.Module:
    return diffusers.AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, mid_block_add_attention=False,
    )  # fmt: skip


@pytest.fixture(scope="module", params=[tiny_wan, tiny_cogvideox, tiny_hunyuan])
def saved(request, tmp_path_factory) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    vae = request.param().eval()
    folder = tmp_path_factory.mktemp(request.param.__name__) / "vae"  # a pipeline layout
    vae.save_pretrained(folder)
    return str(folder.parent), vae


def test_adapter_matches_the_diffusers_model_and_our_latent_contract(saved) -> None:
    folder, vae = saved
    adapter = load_diffusers_vae(folder)
    assert isinstance(adapter, VideoAutoencoder)
    assert (adapter.latent_channels, adapter.temporal_factor, adapter.spatial_factor) == (4, 4, 8)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = adapter.encode(x)
    assert z.shape == (1, 4, 2, 2, 2) and z.shape[1:] == adapter.latent_shape(5, 16, 16)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
    # The normalisation each model's own pipeline applies.
    if adapter.kind == "AutoencoderKLWan":
        mean = torch.tensor([0.1, 0.2, 0.3, 0.4])[None, :, None, None, None]
        std = torch.tensor([2.0, 1.0, 0.5, 1.0])[None, :, None, None, None]
        expected = (raw - mean) / std
    else:
        expected = raw * vae.config.scaling_factor
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    y = adapter.decode(z)
    with torch.no_grad():
        y_ref = vae.decode(raw).sample.clamp(-1, 1)[:, :, -5:]  # CogVideoX: 8 frames, see decode
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_adapter_tiling_restores_the_model_state(saved) -> None:
    folder, _ = saved
    adapter = load_diffusers_vae(folder)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    before = adapter.vae.use_tiling
    z = adapter.encode_tiled(x, tile_px=16, overlap_px=8, chunk_frames=4)
    y = adapter.decode_tiled(z, tile_px=16, overlap_px=8, chunk_frames=4)
    assert z.shape == (1, 4, 1, 4, 4) and y.shape == x.shape
    assert adapter.vae.use_tiling == before


def test_adapter_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no diffusers VAE"):
        load_diffusers_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="supported video VAEs"):
        load_diffusers_vae(tmp_path)
    with pytest.raises(ValueError, match="unsupported diffusers VAE"):
        DiffusersVideoVAE(torch.nn.Linear(2, 2))


def test_a_folder_with_pickled_weights_is_refused_and_runs_nothing(tmp_path) -> None:
    """diffusers falls back to `*.bin` (a pickle) without safetensors: we never do."""
    from tests.payloads import payload

    folder = tmp_path / "vae"
    tiny_wan().save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "diffusion_pytorch_model.bin").write_bytes(payload(marker))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin are pickles.*refused"):
        load_diffusers_vae(folder)
    assert not marker.exists()
