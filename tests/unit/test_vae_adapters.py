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


def tiny_wan22(z_dim: int = 8) -> torch.nn.Module:
    """Wan 2.2's VAE (TI2V-5B) laid out as published, made tiny: residual blocks, frames
    patchified 2 x 2 before the encoder (so 12 channels in and out), 16x spatial and 4x temporal
    compression; z_dim 8 for 48, base widths 8 for 160 / 256."""
    return diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
        in_channels=12, out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=[0.1 * i - 0.3 for i in range(z_dim)],
        latents_std=[0.5 + 0.25 * i for i in range(z_dim)],
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


def encoded(adapter, x: torch.Tensor, factors: tuple[int, int, int],
            shape: tuple[int, ...]) -> torch.Tensor:
    """`adapter.encode(x)`, checking (channels, temporal, spatial) factors and the shape."""
    assert (adapter.latent_channels, adapter.temporal_factor, adapter.spatial_factor) == factors
    z = adapter.encode(x)
    assert z.shape == shape and z.shape[1:] == adapter.latent_shape(*x.shape[2:])
    return z


def test_adapter_matches_the_diffusers_model_and_our_latent_contract(saved) -> None:
    folder, vae = saved
    adapter = load_diffusers_vae(folder)
    assert isinstance(adapter, VideoAutoencoder)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = encoded(adapter, x, (4, 4, 8), (1, 4, 2, 2, 2))
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


@pytest.mark.parametrize("keys", ["saved", "without scale_factor_*"])
def test_the_wan22_vae_is_16x_spatial_and_normalised_per_channel(keys, tmp_path) -> None:
    """Wan 2.2's VAE (patchified, residual): 48 -> 8 channels here, 4 x 16 x 16 compression,
    the factors read from its config or, where a config lacks them, from its layers."""
    torch.manual_seed(0)
    vae = tiny_wan22().eval()
    vae.save_pretrained(tmp_path)
    if keys != "saved":
        config = json.loads((tmp_path / "config.json").read_text())
        del config["scale_factor_spatial"], config["scale_factor_temporal"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    adapter = load_diffusers_vae(tmp_path)
    x = torch.rand(1, 3, 5, 32, 64) * 2 - 1
    z = encoded(adapter, x, (8, 4, 16), (1, 8, 2, 2, 4))
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
        y_ref = vae.decode(raw).sample.clamp(-1, 1)
    mean = torch.tensor(vae.config.latents_mean)[None, :, None, None, None]
    std = torch.tensor(vae.config.latents_std)[None, :, None, None, None]
    torch.testing.assert_close(z, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    y = adapter.decode(z)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
