"""Stable Diffusion 3 / 3.5: MMDiT transformer over a joint CLIP-L + CLIP-G + T5 sequence, flow matching.

The conditioning sequence is [CLIP part (77) ; T5 part (max_sequence_length)], 4096 wide for
SD 3: the CLIP part is the two CLIP encoders' penultimate states concatenated per token and
zero-padded to the T5 width. Learned tokens (4096 wide) are placed around the prompt's real
CLIP tokens; with the padded layout the sequence keeps its length: the last CLIP padding
states give way, and every T5 state keeps its place (token files record this as
`t5_states: kept`; earlier versions dropped the last T5 states instead). The pooled
embedding (both CLIP projections, 2048) is the prompt's own. The unconditional branch
encodes the empty prompt, as the pipeline does. A model folder without T5
(`text_encoder_3` null) gets zeros for the T5 part, exactly like the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ipgo.backbones.base import Backbone, Conditioning, DType, encode_clip
from ipgo.backbones.sd import decode_vae
from ipgo.errors import ConfigError


class StableDiffusion3(Backbone):
    """SD 3 / 3.5 (`StableDiffusion3Pipeline` layout); see `Backbone` for the arguments.

    Args:
        max_sequence_length: T5 tokens, as the pipeline's `max_sequence_length` (256 by default).
    """

    family: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    penultimate_states: ClassVar[bool] = True
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    denoiser_part: ClassVar[str] = "transformer"
    pipeline_parts: ClassVar[tuple[str, ...]] = (
        "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3",
        "transformer", "vae",
    )

    def __init__(
        self,
        model: str = "stabilityai/stable-diffusion-3-medium-diffusers",
        dtype: DType = "float32",
        revision: str | None = None,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
        max_sequence_length: int = 256,
    ) -> None:
        if not 1 <= max_sequence_length <= 512:  # the pipeline's own bound (T5's 512 positions)
            raise ConfigError(f"max_sequence_length must be between 1 and 512 (the T5 prompt length SD 3 pipelines "
                              f"accept), got {max_sequence_length}")
        super().__init__(model, dtype, revision, variant, gradient_checkpointing)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pipeline(cls, pipe: object) -> StableDiffusion3:
        backbone = super().from_pipeline(pipe)
        backbone.max_sequence_length = 256
        return backbone

    def load(self) -> None:
        if self.transformer is not None:
            return
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        self.load_tokenizer()
        self._load_configs()
        self.text_encoder = self._load_weights(CLIPTextModelWithProjection, "text_encoder", "text encoder")
        self.text_encoder_2 = self._load_weights(CLIPTextModelWithProjection, "text_encoder_2", "second text encoder")
        if (self._pipeline_config.get("text_encoder_3") or [None])[0] is not None:
            self.tokenizer_3 = self._load_tokenizer("tokenizer_3")
            self.text_encoder_3 = self._load_weights(T5EncoderModel, "text_encoder_3", "T5 text encoder")
        self.transformer = self._load_weights(SD3Transformer2DModel, "transformer", "transformer")
        self.vae = self._load_weights(AutoencoderKL, "vae", "VAE")
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    @property
    def sequence_length(self) -> int:
        return self.max_length + self.max_sequence_length

    def _encode_batch(self, prompts: list[str], budget: int) -> tuple[Tensor, list[int], Tensor | None]:
        first, lengths, pooled_1 = encode_clip(self.tokenizer, self._loaded(self.text_encoder), prompts, budget,
                                               self.max_length, self._device(), penultimate=self.penultimate_states)
        second, _, pooled_2 = encode_clip(self.tokenizer_2, self.text_encoder_2, prompts, budget, self.max_length,
                                          self._device(), penultimate=self.penultimate_states)
        t5 = self._t5(prompts, first.dtype)
        clip = F.pad(torch.cat([first, second], dim=-1), (0, t5.shape[-1] - first.shape[-1] - second.shape[-1]))
        return torch.cat([clip, t5], dim=-2), lengths, torch.cat([pooled_1, pooled_2], dim=-1)

    @torch.no_grad()
    def _t5(self, prompts: list[str], dtype: torch.dtype) -> Tensor:
        device = self._device()
        if self.text_encoder_3 is None:
            width = self._loaded(self.transformer).config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=device, dtype=dtype)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(device))[0].to(device=device, dtype=dtype)

    def negative(self, batch: int, total: int, prompts: Sequence[str] | None = None) -> Conditioning:
        embeds = self.encode(prompts if prompts is not None else [""] * batch, negative=True)  # padded: all of them
        return Conditioning(embeds.hidden[:, :total], embeds.pooled)

    def denoise(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        transformer = self._loaded(self.transformer)
        return transformer(hidden_states=latents, timestep=timestep.expand(latents.shape[0]),
                           encoder_hidden_states=cond.hidden.to(transformer.dtype),
                           pooled_projections=cond.pooled.to(transformer.dtype), return_dict=False)[0]

    def set_timesteps(self, scheduler: Any, num_steps: int, latent_shape: Sequence[int], device: torch.device) -> None:
        if not scheduler.config.get("use_dynamic_shifting"):
            return super().set_timesteps(scheduler, num_steps, latent_shape, device)
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self._loaded(self.transformer).config.patch_size
        config = scheduler.config
        mu = calculate_shift((latent_shape[-2] // patch) * (latent_shape[-1] // patch),
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.16))  # the pipeline's defaults
        scheduler.set_timesteps(num_steps, device=device, mu=mu)

    def _check_size(self, height: int, width: int) -> int:
        factor = super()._check_size(height, width)
        patch = int(self.part_config("transformer")["patch_size"])
        if (height // factor) % patch or (width // factor) % patch:
            raise ConfigError(f"model.sampler.height and width must be multiples of {factor * patch} for "
                              f"{self.model!r} (VAE factor {factor} x the transformer's patch size {patch})")
        return factor

    def decode(self, latents: Tensor) -> Tensor:
        vae = self._loaded(self.vae)
        return decode_vae(vae, latents, shift=vae.config.shift_factor or 0.0)
