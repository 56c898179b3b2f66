"""Rectified flow: the training loss and an Euler sampler with classifier-free guidance.

Conventions (SD3 / diffusers `FlowMatchEulerDiscreteScheduler`): t = 0 is data, t = 1 is noise,
    x_t = (1 - t) * x0 + t * noise,        velocity target v = noise - x0,
and sampling integrates dx/dt = v from t = 1 down to 0.

Bigger clips need more noise: with more tokens, the same t leaves more of the signal
recoverable (neighbouring tokens average the noise away), so t is shifted towards 1 by
    t' = shift * t / (1 + (shift - 1) * t),   shift = shift_scale * sqrt(N / base_tokens),
where N is the token count of the clip (frames included). That is Open-Sora's resolution- and
length-aware transform; `shift` itself is the same knob as diffusers' scheduler `shift`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Velocity = Callable[..., torch.Tensor]


@dataclass
class FlowConfig:
    logit_mean: float = 0.0  # training t ~ sigmoid(N(logit_mean, logit_std^2)) (SD3)
    logit_std: float = 1.0
    resolution_shift: bool = True  # shift by token count; False: use shift_scale as is
    shift_scale: float = 1.0
    base_tokens: int = 1024  # token count at which the shift is shift_scale (one 512px frame)
    sample_steps: int = 30
    guidance: float = 5.0  # CFG scale; 1.0 turns guidance off

    def validate(self) -> None:
        if self.logit_std <= 0 or self.shift_scale <= 0:
            raise ValueError("logit_std and shift_scale must be > 0")
        if self.base_tokens < 1 or self.sample_steps < 1:
            raise ValueError("base_tokens and sample_steps must be >= 1")

    def shift(self, num_tokens: int) -> float:
        if not self.resolution_shift:
            return self.shift_scale
        return shift_for_tokens(num_tokens, self.base_tokens, self.shift_scale)


def shift_for_tokens(num_tokens: int, base_tokens: int = 1024, scale: float = 1.0) -> float:
    """Timestep shift for a clip of `num_tokens` tokens: grows as sqrt(tokens)."""
    return scale * math.sqrt(num_tokens / base_tokens)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp t in [0, 1] towards 1 (more noise) for shift > 1; fixes 0 and 1."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    batch: int,
    config: FlowConfig,
    num_tokens: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Training times (B,): logit-normal, then shifted for the clip's token count.

    `generator` is one generator for the batch, or one per sample (training seeds each
    sample by (seed, step, slot), so t does not depend on batching or worker count); a
    per-sample generator gives one normal draw for its sample.
    """
    if generator is None or isinstance(generator, torch.Generator):
        z = torch.randn(batch, device=device, generator=generator)
    else:
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        z = torch.cat([torch.randn(1, device=device, generator=g) for g in generator])
    t = torch.sigmoid(config.logit_mean + config.logit_std * z)
    return shift_timesteps(t, config.shift(num_tokens))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t (B,) broadcast over the other dims."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_loss(
    model: Velocity,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    frames: list | None = None,
    **cond,
) -> torch.Tensor:
    """Mean squared error between model(x_t, t, **cond) and the velocity noise - x0.

    With per-sample `weight` (B,): the weighted *sum* of per-sample MSEs, sum_i w_i mse_i
    (w = 0 for padding). The caller divides by the weight summed over all its workers: a
    sharded batch's mean needs the global sum, which this function cannot see.
    `frames`, a list, receives the (B, T) detached MSE per sample and latent frame of
    (B, C, T, H, W) latents: where the loss lives (the training log's loss map).
    """
    noise = torch.randn_like(x0) if noise is None else noise
    pred = model(interpolate(x0, noise, t), t, **cond)
    err = (pred.float() - (noise - x0).float()).square()
    if frames is not None:
        frames.append(err.detach().transpose(1, 2).flatten(2).mean(2) if err.ndim == 5
                      else err.detach().flatten(1).mean(1, keepdim=True))
    if weight is None:
        return err.mean()
    return (err.flatten(1).mean(1) * weight).sum()


def flow_sigmas(steps: int, shift: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The sampling schedule: `steps` + 1 noise levels from 1 to 0, shifted.

    Equal to diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(
    sigmas=linspace(1, 0, steps + 1)[:-1])` plus its appended terminal 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step of dx/dt = v, from sigma to sigma_next (diffusers' `step`)."""
    return x + (sigma_next - sigma) * v


def guided_velocity(
    model: Velocity, x: torch.Tensor, t: torch.Tensor, guidance: float, **cond
) -> torch.Tensor:
    """CFG: v_null + guidance * (v_text - v_null), both halves in one batch."""
    if guidance == 1.0:
        return model(x, t, **cond)
    B = x.shape[0]
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
    drop = torch.arange(2 * B, device=x.device) >= B  # second half sees the null text
    v_text, v_null = model(torch.cat([x, x]), torch.cat([t, t]), drop_text=drop, **doubled).chunk(2)
    return v_null + guidance * (v_text - v_null)


@torch.no_grad()
def sample(
    model: Velocity,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float = 1.0,
    **cond,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0) with `steps` Euler steps.

    `cond` (text, text_mask, fps) is passed to the model; with guidance != 1 the model must
    accept `drop_text` (the DiT does).
    """
    sigmas = flow_sigmas(steps, shift, device=noise.device)
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        t = sigma.expand(x.shape[0])
        v = guided_velocity(model, x, t, guidance, **cond)
        x = euler_step(x, v.to(x.dtype), sigma, sigma_next)
    return x
