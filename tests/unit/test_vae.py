"""The causal video VAE: shapes, causality, exact time chunking, tiling, weights, training."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from models.metrics import psnr
from models.vae import (
    VAEConfig,
    VideoAutoencoder,
    VideoVAE,
    build_vae,
    load_vae,
    save_vae,
    vae_loss,
)


def video(B: int, T: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Coloured squares moving over a plain background, in [-1, 1]; (B, 3, T, H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 1, 1, 1, generator=g).expand(B, 3, T, H, W).clone()
    for b in range(B):
        color = torch.rand(3, 1, 1, generator=g)
        y0, x0 = (torch.randint(0, max(H, W) // 2, (2,), generator=g)).tolist()
        for t in range(T):
            x[b, :, t, y0 + t : y0 + t + H // 3, x0 + t : x0 + t + W // 3] = color
    return x * 2 - 1


PRESETS = ["debug", "dc-debug"]  # the strided-conv design and the DC-AE shortcut design


def random_vae(preset: str = "debug", seed: int = 0) -> VideoVAE:
    """A model with every conv randomly initialised (no zero-init residuals): the worst case
    for tiling seams and a fair test of causality."""
    torch.manual_seed(seed)
    model = build_vae(preset)
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            m.reset_parameters()
    return model.eval()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("T", [1, 5, 9, 17])
def test_shapes_image_and_video(T: int, preset: str) -> None:
    model = build_vae(preset).eval()
    x = video(2, T, 16, 24)
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z)
    assert z.shape == (2, model.latent_channels, 1 + (T - 1) // 4, 2, 3)
    assert z.shape[1:] == model.latent_shape(T, 16, 24)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1
    assert isinstance(model, VideoAutoencoder)
    assert (model.temporal_factor, model.spatial_factor) == (4, 8)


def test_default_preset_is_4x8x8_with_16_channels() -> None:
    config = VAEConfig()
    assert (config.temporal_factor, config.spatial_factor, config.latent_channels) == (4, 8, 16)
    assert build_vae("debug", latent_channels=8).latent_channels == 8


@pytest.mark.parametrize("preset", PRESETS)
def test_encoder_and_decoder_are_causal(preset: str) -> None:
    model = random_vae(preset)
    x = video(1, 17, 16, 16)
    x2 = x.clone()
    x2[:, :, 9] = -x2[:, :, 9]  # frame 9 belongs to latent frame 1 + (9 - 1) // 4 = 3
    with torch.no_grad():
        z, z2 = model.encode(x), model.encode(x2)
    torch.testing.assert_close(z2[:, :, :3], z[:, :, :3], atol=1e-6, rtol=0)
    assert (z2[:, :, 3] - z[:, :, 3]).abs().max() > 1e-3
    z3 = z.clone()
    z3[:, :, 2] += 1.0  # latent frame 2 decodes to pixel frames 5..8
    with torch.no_grad():
        y, y3 = model.decode_raw(z), model.decode_raw(z3)
    torch.testing.assert_close(y3[:, :, :5], y[:, :, :5], atol=1e-6, rtol=0)
    assert (y3[:, :, 5] - y[:, :, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_time_chunks_with_causal_cache_are_exact(preset: str) -> None:
    model = random_vae(preset)
    x = video(1, 17, 16, 16)
    with torch.no_grad():
        z = model.encode(x)
        zc = model.encode_tiled(x, tile_px=256, chunk_frames=4)  # chunks of 5, 4, 4, 4 frames
        y = model.decode(z)
        yc = model.decode_tiled(z, tile_px=256, chunk_frames=4)  # latent chunks 2, 1, 1, 1
    torch.testing.assert_close(zc, z, atol=1e-5, rtol=0)
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_spatial_tiles_match_untiled_within_stated_tolerance(preset: str) -> None:
    # An image twice the tile size each way: 3x3 tiles of 64 px with 32 px overlap (the time
    # chunks are covered above; T=1 keeps this test fast).
    model = random_vae(preset)
    x = video(1, 1, 128, 128, seed=1)
    with torch.no_grad():
        z = model.encode(x)
        zt = model.encode_tiled(x, tile_px=64, overlap_px=32, chunk_frames=4)
        y = model.decode(z)
        yt = model.decode_tiled(z, tile_px=64, overlap_px=32, chunk_frames=4)
    assert zt.shape == z.shape and yt.shape == y.shape
    # Bounds from VideoVAE.encode_tiled's docstring (random init is the worst case).
    rms = (zt - z).pow(2).mean().sqrt() / z.std()
    assert rms < 0.4, f"latent RMS diff {rms:.3f} x std"
    assert psnr(y, yt) > 24.0


def test_save_load_round_trip_is_identical(tmp_path) -> None:
    model = random_vae()
    model.fit_scaling([video(2, 5, 16, 16)])
    path = tmp_path / "vae.safetensors"
    save_vae(model, path)
    loaded = load_vae(path)
    assert loaded.config == model.config
    x = video(1, 5, 16, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        z = model.encode(x)
        assert torch.equal(loaded.decode(z), model.decode(z))


def test_load_rejects_foreign_files(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a tubelet VAE checkpoint"):
        load_vae(path)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing.safetensors")


def test_fit_scaling_gives_unit_variance_latents_and_decode_undoes_it() -> None:
    model = random_vae()
    x = video(2, 5, 16, 16)
    with torch.no_grad():
        y_before = model.decode(model.encode(x))
        scale, shift = model.fit_scaling([x])
        z = model.encode(x)
        y_after = model.decode(z)
    assert math.isclose(z.mean().item(), 0.0, abs_tol=1e-4)
    assert math.isclose(z.std().item(), 1.0, rel_tol=1e-2)
    assert scale == model.scaling_factor and shift == model.shift_factor
    torch.testing.assert_close(y_after, y_before, atol=1e-4, rtol=0)


def test_per_channel_scaling_gives_unit_variance_in_every_channel_and_round_trips(
        tmp_path) -> None:
    model = random_vae()
    x = video(2, 5, 16, 16)
    with torch.no_grad():
        y_before = model.decode(model.encode(x))
        model.fit_scaling([x], per_channel=True)
        z = model.encode(x)
        y_after = model.decode(z)
    per_channel = z.transpose(0, 1).flatten(1)  # (C, N)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(z.shape[1]),
                               atol=1e-3, rtol=0)
    assert isinstance(model.config.scaling_factor, tuple)
    assert len(model.config.scaling_factor) == model.latent_channels
    torch.testing.assert_close(y_after, y_before, atol=1e-4, rtol=0)
    save_vae(model, tmp_path / "vae.safetensors")
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert loaded.config.scaling_factor == model.config.scaling_factor
    assert loaded.config.shift_factor == model.config.shift_factor
    torch.testing.assert_close(loaded.encode(x), z)
    with pytest.raises(ValueError, match="one per latent channel"):
        VAEConfig.from_dict({**asdict(model.config), "scaling_factor": [1.0, 2.0]})


def test_short_training_lowers_reconstruction_loss() -> None:
    torch.manual_seed(0)
    model = build_vae("debug")
    x = video(2, 5, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        recon, posterior = model(x)
        loss, stats = vae_loss(x, recon, posterior, kl_weight=1e-6, grad_weight=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(stats["l1"])
    assert min(losses[-5:]) < 0.6 * losses[0], losses
    assert set(stats) >= {"loss", "l1", "kl", "psnr"}


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 8, 16, 16), r"T=8 frames.*1 \+ 4k"),
        ((1, 3, 5, 20, 16), r"20x16.*multiples of 8"),
        ((1, 3, 5, 16), r"\(B, 3, T, H, W\)"),
        ((1, 4, 5, 16, 16), r"\(B, 3, T, H, W\)"),
    ],
)
def test_bad_shapes_raise_clear_errors(shape: tuple[int, ...], match: str) -> None:
    model = build_vae("debug")
    with pytest.raises(ValueError, match=match):
        model.encode(torch.zeros(shape))


def test_bad_latents_tiles_presets_and_keys_raise() -> None:
    model = build_vae("debug")
    with pytest.raises(ValueError, match=r"latent \(B, 4"):
        model.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="tile_px=60"):
        model.encode_tiled(torch.zeros(1, 3, 5, 16, 16), tile_px=60)
    with pytest.raises(ValueError, match="chunk_frames=6"):
        model.encode_tiled(torch.zeros(1, 3, 5, 16, 16), chunk_frames=6)
    with pytest.raises(ValueError, match="unknown VAE preset 'huge'"):
        build_vae("huge")
    with pytest.raises(ValueError, match="unknown VAEConfig key 'latent_chans'"):
        build_vae("debug", latent_chans=8)
    with pytest.raises(ValueError, match="temporal_strides"):
        VAEConfig(temporal_strides=(2, 2, 2)).validate()
    with pytest.raises(ValueError, match="temporal_strides"):
        VideoVAE(VAEConfig(temporal_strides=(2, 2, 2)))


def test_dc_preset_is_4x8x8_with_16_channels_and_4m_params() -> None:
    model = build_vae("dc")
    assert (model.temporal_factor, model.spatial_factor, model.latent_channels) == (4, 8, 16)
    assert 3e6 < model.num_params() < 5e6
    assert model.latent_shape(17, 64, 96) == (16, 5, 8, 12)


@pytest.mark.parametrize(("s", "t"), [(2, 2), (1, 2), (2, 1)])
def test_space_time_to_channel_is_lossless_and_chunks_like_the_clip(s: int, t: int) -> None:
    from models.vae_blocks import channel_to_space_time, space_time_to_channel

    x = torch.randn(2, 3, 1 + 4 * t, 8, 12)
    y = space_time_to_channel(x, s, t, first=True)
    assert y.shape == (2, 3 * s * s * t, 5 if t == 2 else 5, 8 // s, 12 // s)
    torch.testing.assert_close(channel_to_space_time(y, s, t, first=True), x, atol=0, rtol=0)
    # the first chunk pairs frame 0 with itself; later chunks pair (2j-1, 2j) the same way
    head, tail = x[:, :, : 1 + 2 * t], x[:, :, 1 + 2 * t :]
    parts = [space_time_to_channel(head, s, t, True), space_time_to_channel(tail, s, t, False)]
    torch.testing.assert_close(torch.cat(parts, dim=2), y, atol=0, rtol=0)


def test_shortcut_blocks_start_as_a_plain_down_and_upsampler() -> None:
    """DC-AE: at init each down block averages its 2x2x2 neighbourhood (into channels), each up
    block copies it back, so a smooth video survives a fresh down + up pair nearly whole."""
    from models.vae_blocks import ShortcutDown, ShortcutUp

    down, up = ShortcutDown(8, 16, 2, 2), ShortcutUp(16, 8, 2, 2)
    for m in (down, up):
        nn.init.zeros_(m.conv.conv.weight)  # what VideoVAE.initialize_weights does
        nn.init.zeros_(m.conv.conv.bias)
    x = torch.randn(1, 8, 1, 1, 1).expand(1, 8, 9, 8, 8).contiguous()  # constant per channel
    with torch.no_grad():
        h = down(x)  # groups of 4 of 8 * 8 = 64 channels: half a channel's neighbourhood each
        y = up(h)
    assert h.shape == (1, 16, 5, 4, 4)
    torch.testing.assert_close(h, x[:, :, :5, :4, :4].repeat_interleave(2, dim=1), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_fresh_dc_model_trains_faster_than_the_strided_design() -> None:
    """The design claim at toy scale: same data, same steps and lr, the shortcut
    design reaches a lower reconstruction loss (both ~0.2M params)."""
    x = video(4, 5, 32, 32)
    finals = {}
    for preset in ("debug", "dc-debug"):
        torch.manual_seed(0)
        model = build_vae(preset, channels=(16, 32, 32))
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for _ in range(40):
            recon, posterior = model(x)
            loss, stats = vae_loss(x, recon, posterior)
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals[preset] = stats["l1"]
    assert finals["dc-debug"] < finals["debug"], finals
