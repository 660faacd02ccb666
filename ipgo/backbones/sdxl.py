"""Stable Diffusion XL: two CLIP text encoders, a pooled embedding and size/crop time ids.

How learned tokens apply: the conditioning sequence is the two encoders' penultimate states
concatenated per token (768 + 1280 = 2048 wide for SDXL), so tokens are 2048-wide and placed
around the prompt's real tokens like in SD 1.x. The pooled embedding (the second encoder's
projected EOS state) is the prompt's own, kept as is. Time ids are (H, W, 0, 0, H, W): no crop,
original size = target size, as the pipeline uses by default. The unconditional branch is
zeros when the model's `force_zeros_for_empty_prompt` is set (SDXL base), as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ipgo.backbones.base import Backbone, Conditioning, DType, encode_clip
from ipgo.backbones.sd import decode_vae
from ipgo.errors import UserError


class StableDiffusionXL(Backbone):
    """SDXL (`StableDiffusionXLPipeline` layout); see `Backbone` for the arguments.

    The VAE is kept in float32 when its config asks for it (`force_upcast`): SDXL's VAE gives
    black images in float16.
    """

    family: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    penultimate_states: ClassVar[bool] = True
    unused_last_layer: ClassVar[tuple[str, ...]] = ("text_encoder",)  # pooled comes from text_encoder_2
    tokenizer_parts: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    masks_cross_attention: ClassVar[bool] = True
    pipeline_parts: ClassVar[tuple[str, ...]] = (
        "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae"
    )

    def __init__(
        self,
        model: str = "stabilityai/stable-diffusion-xl-base-1.0",
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
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.load_tokenizer()
        self._check_unet()
        self.text_encoder = self._load_weights(CLIPTextModel, "text_encoder", "text encoder")
        self.text_encoder_2 = self._load_weights(CLIPTextModelWithProjection, "text_encoder_2", "second text encoder")
        self.unet = self._load_weights(UNet2DConditionModel, "unet", "UNet")
        vae_config = AutoencoderKL.load_config(self.source, subfolder="vae", revision=self.revision)
        upcast = vae_config.get("force_upcast", True) and self.dtype == torch.float16
        self.vae = self._load_weights(AutoencoderKL, "vae", "VAE")
        if upcast:  # as the pipeline does: its float16 weights, run in float32 (the same image as the pipeline's)
            self.vae.to(torch.float32)
        self._load_configs()
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def _encode_batch(self, prompts: list[str], budget: int) -> tuple[Tensor, list[int], Tensor | None]:
        device, penultimate, convert = self._device(), self.penultimate_states, self._convert_prompt
        first, lengths, _ = encode_clip(self.tokenizer, self._loaded(self.text_encoder), prompts, budget,
                                        self.max_length, device, penultimate=penultimate, convert=convert)
        second, lengths_2, pooled = encode_clip(self.tokenizer_2, self.text_encoder_2, prompts, budget,
                                                self.max_length, device, penultimate=penultimate, convert=convert)
        if lengths != lengths_2:
            raise UserError("SDXL's two tokenizers split a prompt differently (a textual-inversion token loaded into "
                            "only one of them?): ipgo's tokens need both encoders to see the same prompt positions")
        return torch.cat([first, second], dim=-1), lengths, pooled

    def negative(self, batch: int, total: int, prompts: Sequence[str] | None = None) -> Conditioning:
        if prompts is None:
            empty = self.encode([""])
            if self._pipeline_config.get("force_zeros_for_empty_prompt", True):
                return Conditioning(torch.zeros_like(empty.hidden[:, :total]).expand(batch, -1, -1),
                                    torch.zeros_like(empty.pooled).expand(batch, -1))
            return Conditioning(empty.hidden[:, :total].expand(batch, -1, -1), empty.pooled.expand(batch, -1))
        # cut to `total` tokens, end token kept, as the pipeline tokenises negatives for shorter prompt_embeds
        embeds = self.encode(prompts, self.max_length - total, negative=True)
        return Conditioning(embeds.hidden[:, :total], embeds.pooled)

    def denoise(self, latents: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        unet = self._loaded(self.unet)
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=unet.dtype, device=latents.device)
        added = {"text_embeds": cond.pooled.to(unet.dtype), "time_ids": time_ids.expand(latents.shape[0], -1)}
        return unet(latents, timestep, encoder_hidden_states=cond.hidden.to(unet.dtype), added_cond_kwargs=added,
                    encoder_attention_mask=cond.mask, return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        return decode_vae(self._loaded(self.vae), latents, latent_statistics=True)
