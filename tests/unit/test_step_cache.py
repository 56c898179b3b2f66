"""Step caching and packed batches in the DiT sampler, on one process (sequence- and
CFG-parallel caching: tests/unit/test_sequence_parallel.py).

- cache off is the plain Euler loop over the DiT's own forward, bitwise; threshold 0 too;
- a threshold that skips runs fewer blocks and stays near the exact latents;
- `batch_invariant: false` packs the rows into one forward per branch and step and gives the
  one-at-a-time latents within 1e-5."""

from __future__ import annotations

import torch

from actors.workers.sampler import SamplerConfig, sample_video_latents
from actors.workers.step_cache import StepCacheConfig
from models.dit import build_dit
from models.flow import euler_step, flow_sigmas


def opened(layout: str = "factorized", seed: int = 0) -> torch.nn.Module:
    """A debug DiT with every parameter nudged off its (zero-output) init."""
    torch.manual_seed(seed)
    model = build_dit("debug", layout=layout, in_channels=4, depth=4).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(B: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(B, 4, 3, 6, 8, generator=g),
                text=torch.randn(B, 6, 64, generator=g),
                text_mask=torch.arange(6)[None] < torch.tensor([[2], [6], [4]])[:B],
                fps=torch.full((B,), 8.0), steps=12, shift=2.0, guidance=4.0)


@torch.no_grad()
def plain_loop(dit, noise, text, text_mask, fps, steps, shift, guidance) -> torch.Tensor:
    """The Euler loop a user writes around the DiT's forward: a video at a time, the
    conditional then the null-text branch."""
    out = []
    for i in range(noise.shape[0]):
        x, cond = noise[i:i + 1], dict(text=text[i:i + 1], text_mask=text_mask[i:i + 1],
                                       fps=fps[i:i + 1])
        sigmas = flow_sigmas(steps, shift)
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
            t = sigma.expand(1)
            v_cond = dit(x, t, **cond).float()
            v_null = dit(x, t, drop_text=torch.ones(1, dtype=torch.bool), **cond).float()
            x = euler_step(x, v_null + guidance * (v_cond - v_null), sigma, nxt)
        out.append(x)
    return torch.cat(out)


def count_blocks(dit) -> list[int]:
    """Counts every DiT block call from here on."""
    calls = [0]
    for block in dit.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cache_off_and_threshold_zero_are_the_plain_loop_bitwise():
    dit, z = opened(), inputs()
    want = plain_loop(dit, **z)
    assert torch.equal(sample_video_latents(dit, **z), want)
    off = StepCacheConfig(enabled=False, threshold=0.5)
    assert torch.equal(sample_video_latents(dit, **z, cache=off), want)
    skipped = []
    zero = StepCacheConfig(enabled=True, threshold=0.0)
    assert torch.equal(sample_video_latents(dit, **z, cache=zero, skipped=skipped), want)
    assert skipped == [0, 0, 0]


def test_a_threshold_skips_blocks_and_stays_near_the_exact_latents():
    dit, z = opened(), inputs()
    exact = sample_video_latents(dit, **z)
    calls = count_blocks(dit)
    sample_video_latents(dit, **z)
    full = calls[0]
    calls[0], skipped = 0, []
    cached = sample_video_latents(dit, **z, cache=StepCacheConfig(True, 0.15), skipped=skipped)
    depth, steps = len(dit.blocks), z["steps"]
    assert len(skipped) == 3 and all(0 < s < steps - 1 for s in skipped), skipped
    # a skipped step runs the first block of both branches only
    assert calls[0] == full - sum(skipped) * 2 * (depth - 1)
    rel = (cached - exact).norm() / exact.norm()
    assert 0 < rel < 0.1, rel


def test_packed_batches_equal_one_video_per_forward():
    dit, z = opened(layout="full3d"), inputs()
    calls = count_blocks(dit)
    alone = sample_video_latents(dit, **z)
    one_by_one, calls[0] = calls[0], 0
    packed = sample_video_latents(dit, **z, batch_invariant=False)
    assert calls[0] * 3 == one_by_one  # 3 rows in each forward
    assert (packed - alone).abs().max() < 1e-5
    # with caching, one decision for the packed rows
    skipped = []
    cached = sample_video_latents(dit, **z, batch_invariant=False,
                                  cache=StepCacheConfig(True, 0.15), skipped=skipped)
    assert len(set(skipped)) == 1 and skipped[0] > 0
    assert (cached - alone).norm() / alone.norm() < 0.1


def test_sampler_config_takes_the_cache_section_as_shipped_to_a_stage():
    from dataclasses import asdict

    cfg = SamplerConfig(cache=StepCacheConfig(enabled=True, threshold=0.2),
                        batch_invariant=False)
    again = SamplerConfig(**asdict(cfg))
    assert again.cache == StepCacheConfig(enabled=True, threshold=0.2)
    assert not again.batch_invariant
