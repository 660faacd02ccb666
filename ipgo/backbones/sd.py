"""Stable Diffusion 1.x / 2.x: one CLIP text encoder (last layer), UNet2DConditionModel, AutoencoderKL.

SD 2.x differs only in configuration (OpenCLIP-H text encoder of width 1024, v-prediction
schedulers), which diffusers' configs carry, so one adapter serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ipgo.backbones.base import Backbone, Conditioning, DType, encode_clip


class StableDiffusion(Backbone):
    """Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline` layout); see `Backbone` for the arguments."""

    family: ClassVar[str] = "sd"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer",)
    masks_cross_attention: ClassVar[bool] = True
    pipeline_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "text_encoder", "unet", "vae")

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        dtype: DType = "float32",
        revision: str | None = None,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(model, dtype, revision, variant, gradient_checkpointing)

    def load(self) -> None:
        if self.unet is not None:
            return
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.load_tokenizer()
        self._check_unet()
        self.text_encoder = self._load_weights(CLIPTextModel, "text_encoder", "text encoder")
        self.unet = self._load_weights(UNet2DConditionModel, "unet", "UNet")
        self.vae = self._load_weights(AutoencoderKL, "vae", "VAE")
        self._load_configs()
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def _encode_batch(self, prompts: list[str], budget: int) -> tuple[Tensor, list[int], Tensor | None]:
        hidden, lengths, _ = encode_clip(self.tokenizer, self._loaded(self.text_encoder), prompts, budget,
                                         self.max_length, self._device(), convert=self._convert_prompt)
        return hidden, lengths, None

    def negative(self, batch: int, total: int, prompts: Sequence[str] | None = None) -> Conditioning:
        if prompts is None:
            return Conditioning(self.encode([""]).hidden[:, :total].expand(batch, -1, -1))
        # cut to `total` tokens, end token kept, as the pipeline tokenises negatives for shorter prompt_embeds
        return Conditioning(self.encode(prompts, self.max_length - total, negative=True).hidden[:, :total])

    def denoise(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        unet = self._loaded(self.unet)
        return unet(latents, timestep, encoder_hidden_states=cond.hidden.to(unet.dtype),
                    encoder_attention_mask=cond.mask, return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        return decode_vae(self._loaded(self.vae), latents)


def decode_vae(vae: Any, latents: Tensor, shift: float = 0.0, latent_statistics: bool = False) -> Tensor:
    """Images in [0, 1] from latents as diffusers pipelines decode them: x / scaling + shift, or with
    `latent_statistics` (the SDXL pipeline) x * std / scaling + mean where the VAE's config has
    `latents_mean` and `latents_std` (Playground-v2.5-style VAEs)."""
    config, latents = vae.config, latents.to(vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if latent_statistics and mean is not None and std is not None:
        mean, std = (torch.tensor(v, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
                     for v in (mean, std))
        scaled = latents * std / config.scaling_factor + mean
    else:
        scaled = latents / config.scaling_factor + shift
    if torch.is_grad_enabled() and scaled.requires_grad:
        images = vae.decode(scaled, return_dict=False)[0]
    else:  # renders for reports and validation: one at a time, as a 1024 px decode holds gigabytes of activations
        images = torch.cat([vae.decode(one, return_dict=False)[0] for one in scaled.split(1)])
    return (images.float() / 2 + 0.5).clamp(0, 1)
