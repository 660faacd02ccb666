"""Truncated sampling: T scheduler steps, only the last K of them with autograd.

    x_T = sigma_0 · noise                                   (noise from one seed per image)
    for the first T - K timesteps, under torch.no_grad():   no graph is built at all
        eps = eps_u + g · (eps_c - eps_u)                   classifier-free guidance, g > 1
        x   = scheduler.step(eps, t, x)
    for the last K timesteps, with autograd (as the caller's grad mode allows):
        the same update, now differentiable w.r.t. the conditioning
    image = clamp(VAE.decode(x / scaling) / 2 + 0.5, 0, 1)

The unconditional and conditional branches run as one batch [uncond; cond], in that order,
exactly as diffusers pipelines do, so a pipeline given the same embeddings and seeds
renders the same image. Stateful schedulers (LMS, DPM-Solver++) get a fresh instance per
trajectory; their stored history from the first T - K steps holds no graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ipgo.backbones.base import Backbone, Conditioning
from ipgo.errors import ConfigError

SchedulerName = Literal["ddim", "euler", "lms", "dpmpp_2m", "flow_euler"]
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
}


def _zero_snr_capable(cls: type) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls).parameters


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler of kind `name` built from a model's scheduler config."""
    try:
        cls, overrides = SCHEDULERS[name]
    except KeyError:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    flow_model = str(config.get("_class_name", "")).startswith("FlowMatch")
    if flow_model != (name == "flow_euler"):
        kind = "a flow-matching model (SD 3): use scheduler flow_euler" if flow_model else (
            "a diffusion model: flow_euler is for flow-matching models (SD 3)")
        raise ConfigError(f"scheduler {name!r} does not fit {kind}")
    if config.get("rescale_betas_zero_snr") and not _zero_snr_capable(cls):
        # it would silently sample a noise schedule the model was not trained on
        fitting = ", ".join(n for n, (c, _) in SCHEDULERS.items() if _zero_snr_capable(c))
        raise ConfigError(f"scheduler {name!r} cannot sample this zero-terminal-SNR model (rescale_betas_zero_snr); "
                         f"choose one of {fitting}")
    return cls.from_config(config, **overrides)


@dataclass
class SamplerConfig:
    """How images are sampled during optimisation and rendering."""

    scheduler: SchedulerName = "lms"
    """Scheduler: ddim, euler, lms, dpmpp_2m (DPM-Solver++ 2M) or flow_euler (SD 3), from the model's config."""
    num_steps: int = 50
    """Total denoising steps T."""
    grad_steps: int = 2
    """Last K steps that carry gradients (1 <= K <= T)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; <= 1 turns guidance off."""
    height: int = 512
    """Image height in pixels."""
    width: int = 512
    """Image width in pixels."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.grad_steps <= self.num_steps:
            raise ConfigError(f"need 0 < grad_steps <= num_steps, got {self.grad_steps} and {self.num_steps}")
        if self.height < 8 or self.width < 8 or self.height % 8 or self.width % 8:
            raise ConfigError(f"model.sampler.height and width must be multiples of 8 (as diffusers pipelines ask), "
                              f"got {self.height} x {self.width}")


def initial_noise(backbone: Backbone, config: SamplerConfig, seeds: Sequence[int], device: Any) -> Tensor:
    """Noise for one image per seed, drawn on the CPU (reproducible on any device)."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = backbone.latent_shape(len(seeds), config.height, config.width)
    return randn_tensor(shape, generator=generators, device=torch.device(device), dtype=backbone.dtype)


class TruncatedSampler:
    """Samples images from conditioning with gradients through the last K steps only."""

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config

    def __call__(self, backbone: Backbone, cond: Conditioning, uncond: Conditioning, noise: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1].

        Args:
            backbone: the loaded model.
            cond: conditioning, states (B, S', D) differentiable.
            uncond: the unconditional branch, same shapes.
            noise: initial noise (B, C, h, w) from `initial_noise`.
        """
        scheduler = make_scheduler(self.config.scheduler, backbone.scheduler_config)
        backbone.set_timesteps(scheduler, self.config.num_steps, noise.shape, noise.device)
        timesteps = scheduler.timesteps
        n_free = len(timesteps) - self.config.grad_steps
        guided = self.config.guidance_scale > 1
        both = Conditioning.cat(uncond, cond) if guided else cond  # states (2B or B, S', D)
        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        with torch.no_grad():
            frozen = both.detach()
            for t in timesteps[:n_free]:
                latents = self._step(backbone, scheduler, latents, t, frozen, guided)
        for t in timesteps[n_free:]:
            # while the latents carry no gradient (the first gradient step), the unconditional half cannot reach the
            # tokens: it runs without a graph, which halves what that step stores for the backward pass
            split = guided and requires_grad(cond) and not requires_grad(uncond) and not latents.requires_grad
            latents = self._step(backbone, scheduler, latents, t, (uncond, cond) if split else both, guided)
        return backbone.decode(latents)

    def _step(self, backbone: Backbone, scheduler: Any, latents: Tensor, t: Tensor,
              cond: Conditioning | tuple[Conditioning, Conditioning], guided: bool) -> Tensor:
        """One scheduler step; `cond` is the (2B or B) batch, or (unconditional, conditional) to run apart."""
        scale = getattr(scheduler, "scale_model_input", None)  # flow matching has none
        if isinstance(cond, tuple):
            model_input = latents if scale is None else scale(latents, t)
            with torch.no_grad():
                uncond_pred = backbone.denoise(model_input, t, cond[0])
            cond_pred = backbone.denoise(model_input, t, cond[1])
        else:
            model_input = torch.cat([latents] * 2) if guided else latents
            prediction = backbone.denoise(model_input if scale is None else scale(model_input, t), t, cond)
            if not guided:
                return scheduler.step(prediction, t, latents, return_dict=False)[0]
            uncond_pred, cond_pred = prediction.chunk(2)
        prediction = uncond_pred + self.config.guidance_scale * (cond_pred - uncond_pred)
        return scheduler.step(prediction, t, latents, return_dict=False)[0]


def requires_grad(cond: Conditioning) -> bool:
    """Whether gradients flow through the conditioning (and are being recorded)."""
    pooled = cond.pooled is not None and cond.pooled.requires_grad
    return torch.is_grad_enabled() and (cond.hidden.requires_grad or pooled)
