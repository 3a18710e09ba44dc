"""Rectified flow: training objective, timestep sampling, samplers and guidance.

Convention (as in SD3 / diffusers' ``FlowMatchEulerDiscreteScheduler``): ``t`` (= sigma)
runs from 1 (pure noise) to 0 (data), ``x_t = (1 - t) x0 + t * noise`` and the model
predicts the velocity ``v = noise - x0``; sampling integrates ``dx/dt = v`` from t=1 to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

#: ``velocity(x_t, t) -> v``; ``t`` is a (B,) tensor of sigmas in [0, 1].
VelocityFn = Callable[[Tensor, Tensor], Tensor]


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Resolution shift ``s*t / (1 + (s-1)*t)``: shift > 1 spends more steps at high noise."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class RectifiedFlow:
    """The rectified-flow (InstaFlow/SD3-style) training objective.

    Args:
        timestep_sampling: ``uniform``, ``logit_normal`` (SD3; concentrates on mid noise)
            or ``mode`` is not offered — the two cover the paper's and the quickstart's needs.
        logit_mean: mean of the normal before the sigmoid (logit-normal only).
        logit_std: std of the normal before the sigmoid (logit-normal only).
        shift: training-time timestep shift applied after sampling (1 = none).
    """

    def __init__(
        self,
        timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ) -> None:
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.shift = shift

    def sample_t(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        if self.timestep_sampling == "uniform":
            t = torch.rand(batch_size, generator=generator, device=device)
        else:
            t = torch.sigmoid(
                self.logit_mean + self.logit_std * torch.randn(batch_size, generator=generator, device=device)
            )
        return shift_sigmas(t, self.shift)

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def loss(
        self,
        velocity: VelocityFn,
        x0: Tensor,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> Tensor:
        """MSE between predicted and true velocity; ``reduction='none'`` gives per-sample losses."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        xt = self.interpolate(x0, noise, t)
        pred = velocity(xt, t)
        per_sample = (pred.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
        return per_sample.mean() if reduction == "mean" else per_sample


def flow_sigmas(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``num_steps + 1`` sigmas from 1 to 0 (inclusive), shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


def diffusers_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The sigmas diffusers' ``FlowMatchEulerDiscreteScheduler`` uses (for exact comparisons)."""
    # diffusers spaces the steps down to the *shifted* training minimum, then shifts again
    sigma_min = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift).item()
    sig = shift_sigmas(torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64), shift)
    return torch.cat([sig, sig.new_zeros(1)]).float()


@torch.no_grad()
def sample_euler(velocity: VelocityFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Explicit Euler from ``sigmas[0]`` to ``sigmas[-1]``."""
    x = noise
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(x.shape[0]).to(x.device)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * velocity(x, t)
    return x


@torch.no_grad()
def sample_heun(velocity: VelocityFn, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's second-order method (trapezoidal correction; Euler on the last step to t=0)."""
    x = noise
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        dt = (s_next - s).to(x.dtype)
        v = velocity(x, s.expand(x.shape[0]).to(x.device))
        x_pred = x + dt * v
        if float(s_next) == 0.0:
            x = x_pred
        else:
            v_next = velocity(x_pred, s_next.expand(x.shape[0]).to(x.device))
            x = x + dt * 0.5 * (v + v_next)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


#: How the sampling sigmas are spaced. ``flux``: ``num_steps + 1`` points evenly from 1 to 0,
#: then shifted (Flux / Krea-2 pipelines). ``diffusers``: the default ``set_timesteps`` of
#: diffusers' ``FlowMatchEulerDiscreteScheduler`` (evenly down to the shifted training minimum
#: ``1 / num_train_timesteps``, shifted, then 0) — with it, Euler equals that scheduler step for step.
SPACINGS = ("flux", "diffusers")


def sampling_sigmas(
    num_steps: int,
    shift: float = 1.0,
    spacing: Literal["flux", "diffusers"] = "flux",
    device: torch.device | str = "cpu",
) -> Tensor:
    """The ``num_steps + 1`` sigmas a sampler walks through, for a :data:`SPACINGS` choice."""
    if spacing == "flux":
        return flow_sigmas(num_steps, shift, device=device)
    if spacing == "diffusers":
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return diffusers_sigmas(num_steps, shift).to(device)
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def sample(
    velocity: VelocityFn,
    noise: Tensor,
    num_steps: int = 25,
    sampler: Literal["euler", "heun"] = "euler",
    shift: float = 1.0,
    sigmas: Tensor | None = None,
    spacing: Literal["flux", "diffusers"] = "flux",
) -> Tensor:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if sigmas is None:
        sigmas = sampling_sigmas(num_steps, shift, spacing, device=noise.device)
    return SAMPLERS[sampler](velocity, noise, sigmas.to(noise.device))


def combine_guidance(
    v_cond: Tensor, v_uncond: Tensor | None, scale: float, v_image: Tensor | None = None, image_scale: float = 1.0
) -> Tensor:
    """Classifier-free guidance from already computed velocities (see :func:`guided_velocity`)."""
    if v_image is None:
        if v_uncond is None or scale == 1.0:
            return v_cond
        return v_uncond + scale * (v_cond - v_uncond)
    if v_uncond is None:
        raise ValueError("image guidance needs the unconditional velocity as well")
    return v_uncond + image_scale * (v_image - v_uncond) + scale * (v_cond - v_image)


def guided_velocity(
    cond: VelocityFn,
    uncond: VelocityFn,
    scale: float,
    image_cond: VelocityFn | None = None,
    image_scale: float = 1.0,
) -> VelocityFn:
    """Classifier-free guidance.

    With ``image_cond`` (conditioned on the images but not the text, for editing), the
    InstructPix2Pix form: ``u + s_img (v_img - u) + s_txt (v_full - v_img)``.
    """

    def v(x: Tensor, t: Tensor) -> Tensor:
        if image_cond is None:
            if scale == 1.0:
                return cond(x, t)
            return combine_guidance(cond(x, t), uncond(x, t), scale)
        return combine_guidance(cond(x, t), uncond(x, t), scale, image_cond(x, t), image_scale)

    return v


def logit_normal_density(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Density of the logit-normal timestep distribution (for plots and tests)."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
