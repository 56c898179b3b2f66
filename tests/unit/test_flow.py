"""Rectified flow: path, target, timestep shift, Euler sampler, CFG; diffusers parity."""

import pytest
import torch

from models.dit import build_dit
from models.flow import (
    FlowConfig,
    euler_step,
    flow_loss,
    flow_sigmas,
    guided_velocity,
    interpolate,
    sample,
    sample_timesteps,
    shift_for_tokens,
    shift_timesteps,
)


def test_path_and_velocity_target():
    x0, noise = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = interpolate(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(xt[2], noise[2])
    # A model that knows the answer has zero loss; the target is noise - x0.
    assert flow_loss(lambda x, t: noise - x0, x0, t, noise).item() == 0.0
    assert flow_loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() == pytest.approx(
        (noise - x0).square().mean().item()
    )


def test_shift_formula():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 3.0)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()  # more noise, same ends
    assert (s[1:] > s[:-1]).all()


def test_shift_grows_with_resolution_and_length():
    assert shift_for_tokens(1024) == 1.0
    assert shift_for_tokens(4096) == pytest.approx(2.0)  # 4x tokens -> 2x shift
    cfg = FlowConfig()
    frame = 45 * 80  # one 720p frame of tokens (8x VAE, 2x2 patch)
    assert cfg.shift(frame) < cfg.shift(17 * frame)  # longer clip, more noise
    assert cfg.shift(32 * 32) < cfg.shift(frame)  # bigger frame, more noise
    assert FlowConfig(resolution_shift=False, shift_scale=3.0).shift(10**6) == 3.0


def test_training_timesteps_are_logit_normal_then_shifted():
    g = torch.Generator().manual_seed(0)
    plain = sample_timesteps(20000, FlowConfig(resolution_shift=False), 1, generator=g)
    assert 0 < plain.min() and plain.max() < 1
    assert plain.median().item() == pytest.approx(0.5, abs=0.02)
    shifted = sample_timesteps(20000, FlowConfig(), 4 * 1024, generator=g)  # shift 2
    assert shifted.median().item() == pytest.approx(2 * 0.5 / (1 + 0.5), abs=0.02)


def test_per_sample_generators_give_each_sample_its_own_time():
    """Training seeds one generator per sample: a sample's t must not depend on its batch."""
    cfg = FlowConfig()
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample_timesteps(3, cfg, 2048, generator=gens(5, 6, 7))
    alone = sample_timesteps(1, cfg, 2048, generator=gens(6))
    assert batch[1] == alone[0] and len(set(batch.tolist())) == 3
    # one normal draw per generator, then the same logit-normal + shift as one generator
    z = torch.randn(1, generator=torch.Generator().manual_seed(7))
    want = shift_timesteps(torch.sigmoid(cfg.logit_mean + cfg.logit_std * z), cfg.shift(2048))
    assert torch.equal(batch[2:], want)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample_timesteps(3, cfg, 2048, generator=gens(1, 2))


def test_weighted_flow_loss_is_the_weighted_sum_of_per_sample_errors():
    x0, noise = torch.randn(3, 2, 1, 2, 2), torch.randn(3, 2, 1, 2, 2)
    t, w = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 0.0, 2.0])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - error = (noise - x0)^2
    per_sample = (noise - x0).square().flatten(1).mean(1)
    loss = flow_loss(zero, x0, t, noise, weight=w)
    torch.testing.assert_close(loss, per_sample[0] + 2 * per_sample[2])
    x0[1] += 100.0  # a zero-weight (padding) sample does not count
    assert torch.equal(flow_loss(zero, x0, t, noise, weight=w), loss)
    ones = flow_loss(zero, x0, t, noise, weight=torch.ones(3))
    torch.testing.assert_close(ones / 3, flow_loss(zero, x0, t, noise))  # the default: mean


def test_frame_losses_are_each_latent_frames_mse():
    """The loss map's values: the (B, T) MSE of each sample's latent frames, whose mean over
    frames is the sample's loss (equal-size frames)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)
    t = torch.rand(3, generator=g)
    pred = torch.randn(3, 4, 5, 2, 2, generator=g)
    frames: list[torch.Tensor] = []
    loss = flow_loss(lambda x, t: pred, x0, t, noise, frames=frames)
    want = (pred - (noise - x0)).square().mean(dim=(1, 3, 4))  # (B, T)
    torch.testing.assert_close(frames[0], want)
    torch.testing.assert_close(frames[0].mean(), loss)


def test_sigmas_run_from_noise_to_data():
    s = flow_sigmas(10, shift=3.0)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    torch.testing.assert_close(s, shift_timesteps(torch.linspace(1, 0, 11), 3.0))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (25, 7.5)])
def test_euler_with_exact_velocity_lands_on_the_data(steps, shift):
    # Rectified-flow paths are straight: with the true velocity every Euler step is exact.
    x0, noise = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    oracle = lambda x, t: noise - x0  # noqa: E731
    torch.testing.assert_close(sample(oracle, noise, steps, shift), x0, atol=1e-5, rtol=1e-5)


def test_euler_step_is_the_diffusers_update():
    x, v = torch.randn(4), torch.randn(4)
    out = euler_step(x, v, torch.tensor(0.8), torch.tensor(0.6))
    torch.testing.assert_close(out, x + (0.6 - 0.8) * v)


def test_cfg_combines_text_and_null_velocities():
    def fake(x, t, drop_text=None, text=None):
        return x + torch.where(drop_text, 1.0, 3.0).reshape(-1, 1)  # null: +1, text: +3

    x, t = torch.zeros(2, 5), torch.full((2,), 0.5)
    text = torch.randn(2, 4)
    v = guided_velocity(fake, x, t, 4.0, text=text)
    torch.testing.assert_close(v, torch.full((2, 5), 1.0 + 4.0 * (3.0 - 1.0)))
    assert guided_velocity(lambda x, t, text: x + 7, x, t, 1.0, text=text).eq(7).all()


def test_sampling_a_dit_with_guidance():
    torch.manual_seed(0)
    model = build_dit("debug", in_channels=4).eval()
    noise, text = torch.randn(2, 4, 2, 6, 10), torch.randn(2, 3, 64)
    out = sample(model, noise, steps=3, shift=2.0, guidance=4.0, text=text, fps=24.0)
    assert out.shape == noise.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("steps,shift", [(5, 1.0), (12, 3.0), (30, 7.0)])
def test_matches_diffusers_flow_match_euler(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].numpy())
    torch.testing.assert_close(scheduler.sigmas, flow_sigmas(steps, shift))

    def velocity(x, t):  # any deterministic field will do; this one depends on x and t
        return torch.sin(3 * x) * (1 + t.reshape(-1, 1)) - x

    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(velocity, noise, steps, shift)
    x = noise
    for timestep in scheduler.timesteps:
        t = (timestep / scheduler.config.num_train_timesteps).expand(3)
        x = scheduler.step(velocity(x, t), timestep, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
