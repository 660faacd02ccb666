"""Stable Diffusion 1.x / 2.x: CLIP text encoder, UNet2DConditionModel, AutoencoderKL."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ipgo.backbones.base import (
    Backbone,
    DType,
    PromptEmbeds,
    TooLong,
    check_model_source,
    load_error,
    torch_dtype,
)
from ipgo.errors import UserError
from ipgo.testing import is_tiny, resolve_source


class PromptTooLongError(UserError, ValueError):
    """A prompt that does not fit beside the learned tokens."""


class StableDiffusion(Backbone):
    """Stable Diffusion 1.x / 2.x loaded with diffusers' `from_pretrained` (hub id or local folder).

    Args:
        model: hub id (e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5") or a local folder.
        dtype: dtype of the frozen weights; learned tokens stay float32.
        revision: hub revision.
        variant: weight variant, e.g. "fp16".
        gradient_checkpointing: recompute UNet and VAE activations in the backward pass.
    """

    family = "sd"

    def __init__(
        self,
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        dtype: DType = "float32",
        revision: str | None = None,
        variant: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not is_tiny(model):
            check_model_source(model)
        torch_dtype(dtype)
        self.model = model
        self.dtype_name = dtype
        self.revision = revision
        self.variant = variant
        self.gradient_checkpointing = gradient_checkpointing
        self.tokenizer: Any = None
        self.text_encoder: nn.Module | None = None
        self.unet: nn.Module | None = None
        self.vae: nn.Module | None = None
        self._scheduler_config: dict[str, Any] | None = None
        self._cache: dict[tuple[str, int, str], tuple[Tensor, int, int]] = {}

    @classmethod
    def from_pipeline(cls, pipe: Any) -> StableDiffusion:
        """Wrap the components of a loaded diffusers pipeline (nothing is reloaded)."""
        backbone = cls.__new__(cls)
        nn.Module.__init__(backbone)
        backbone.model = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", ""))
        backbone.dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(
            pipe.text_encoder.dtype, "float32"
        )
        backbone.revision = backbone.variant = None
        backbone.gradient_checkpointing = False
        backbone.tokenizer = pipe.tokenizer
        backbone.text_encoder, backbone.unet, backbone.vae = pipe.text_encoder, pipe.unet, pipe.vae
        backbone._scheduler_config = dict(pipe.scheduler.config)
        backbone._cache = {}
        return backbone

    # -- loading -------------------------------------------------------------------------
    def _from_pretrained(self, cls: Any, subfolder: str, what: str, **kwargs: Any) -> Any:
        try:
            source = resolve_source(self.model)
            return cls.from_pretrained(source, subfolder=subfolder, revision=self.revision, **kwargs)
        except OSError as error:
            raise load_error(self.model, what, error) from error

    def load_tokenizer(self) -> None:
        if self.tokenizer is None:
            from transformers import CLIPTokenizer

            tokenizer = self._from_pretrained(CLIPTokenizer, "tokenizer", "tokenizer")
            if len(tokenizer) <= 3:  # transformers 5 builds a 2-token tokenizer when no files are found
                raise load_error(self.model, "tokenizer", OSError("no tokenizer files were found"))
            self.tokenizer = tokenizer

    def load(self) -> None:
        if self.unet is not None:
            return
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.load_tokenizer()
        weights = {"dtype": self.dtype, "variant": self.variant}
        self.text_encoder = self._from_pretrained(CLIPTextModel, "text_encoder", "text encoder", **weights)
        self.unet = self._from_pretrained(UNet2DConditionModel, "unet", "UNet", **weights)
        self.vae = self._from_pretrained(AutoencoderKL, "vae", "VAE", **weights)
        try:
            self._scheduler_config = dict(
                DDIMScheduler.load_config(resolve_source(self.model), subfolder="scheduler", revision=self.revision)
            )
        except OSError as error:
            raise load_error(self.model, "scheduler config", error) from error
        for part in (self.text_encoder, self.unet, self.vae):
            part.requires_grad_(False).eval()
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def train(self, mode: bool = True) -> StableDiffusion:
        """Frozen parts stay in eval mode whatever the trainer asks."""
        return super().train(False)

    # -- protocol ------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._loaded(self.text_encoder).config.hidden_size)

    @property
    def max_length(self) -> int:
        self.load_tokenizer()
        return int(self.tokenizer.model_max_length)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._loaded(self._scheduler_config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self._loaded(self.vae).config.block_out_channels) - 1)

    def token_lengths(self, prompts: Sequence[str]) -> list[int]:
        self.load_tokenizer()
        return [len(ids) for ids in self.tokenizer(list(prompts), truncation=False).input_ids]

    def encode(self, prompts: Sequence[str], reserved: int = 0, too_long: TooLong = "error") -> PromptEmbeds:
        budget = self.max_length - reserved
        device = next(self._loaded(self.text_encoder).parameters()).device
        missing = [p for p in dict.fromkeys(prompts) if (p, budget, str(device)) not in self._cache]
        if missing:
            self._encode_into_cache(missing, budget, device)
        rows = [self._cache[(p, budget, str(device))] for p in prompts]
        check_prompt_lengths(prompts, [full for _, _, full in rows], budget, reserved, too_long)
        return PromptEmbeds(
            torch.stack([hidden for hidden, _, _ in rows]),
            torch.tensor([length for _, length, _ in rows], device=device),
        )

    @torch.no_grad()
    def _encode_into_cache(self, prompts: list[str], budget: int, device: torch.device) -> None:
        """Encode once per prompt and budget; keep the states, the kept length and the untruncated length."""
        full_lengths = self.token_lengths(prompts)
        ids = self.tokenizer(prompts, truncation=True, max_length=budget).input_ids
        pad = self.tokenizer.pad_token_id
        padded = torch.tensor([row + [pad] * (self.max_length - len(row)) for row in ids], device=device)
        hidden = self.text_encoder(padded).last_hidden_state  # (B, S, D), no mask, as diffusers does
        for prompt, row, states, full in zip(prompts, ids, hidden, full_lengths):
            self._cache[(prompt, budget, str(device))] = (states, len(row), full)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for {self.model!r}")
        return (batch, int(self._loaded(self.unet).config.in_channels), height // factor, width // factor)

    def denoise(self, latents: Tensor, timestep: Tensor, hidden: Tensor) -> Tensor:
        unet = self._loaded(self.unet)
        return unet(latents, timestep, encoder_hidden_states=hidden.to(unet.dtype), return_dict=False)[0]

    def decode(self, latents: Tensor) -> Tensor:
        vae = self._loaded(self.vae)
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def _loaded(self, part: Any) -> Any:
        if part is None:
            raise RuntimeError(f"{type(self).__name__}({self.model!r}) is not loaded yet: call .load() first")
        return part


def check_prompt_lengths(
    prompts: Sequence[str], lengths: Sequence[int], budget: int, reserved: int, too_long: TooLong
) -> None:
    """Apply the too-long policy: raise on the first prompt over budget, or warn and let it be cut."""
    over = [(i, p, n) for i, (p, n) in enumerate(zip(prompts, lengths)) if n > budget]
    if not over:
        return
    i, prompt, n = over[0]
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    what = (
        f"prompt {i} ({shown!r}) has {n} tokens but only {budget} fit beside the {reserved} learned tokens"
        + (f" ({len(over)} prompts are too long)" if len(over) > 1 else "")
    )
    if too_long == "error":
        raise PromptTooLongError(
            f"{what}. Shorten the prompt, learn fewer tokens (model.tokens.n_prefix / n_suffix), "
            "or set model.too_long=truncate to cut it."
        )
    if too_long == "truncate":
        warnings.warn(f"{what}: truncating to {budget} tokens (model.too_long=truncate).", stacklevel=3)
        return
    raise ValueError(f"unknown too_long policy {too_long!r}; choose 'error' or 'truncate'")
