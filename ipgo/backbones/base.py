"""The backbone protocol: the only interface the module, sampler and export see of a model family.

A backbone owns the frozen parts of a text-to-image model (tokenizer, text encoder,
denoiser, VAE, scheduler config). Construction is cheap and only checks the model source;
`load_tokenizer()` loads the tokenizer alone (so prompts can be checked before any weights
load), `load()` the weights. Backbones are `nn.Module`s so that Lightning moves them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ipgo.errors import UserError

DType = Literal["float32", "float16", "bfloat16"]
TooLong = Literal["error", "truncate"]


@dataclass
class PromptEmbeds:
    """A batch of encoded prompts.

    hidden: (B, S, D) text-encoder states over the prompt padded to the model's length S.
    lengths: (B,) real tokens per prompt, BOS and EOS included.
    """

    hidden: Tensor
    lengths: Tensor

    def __getitem__(self, index: Any) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index], self.lengths[index])

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([e.hidden for e in items]), torch.cat([e.lengths for e in items]))


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model id or local folder that cannot be loaded."""


def looks_like_path(model: str) -> bool:
    """True for strings that can only be a local folder (not a `org/name` hub id)."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or os.sep in model and os.path.exists(model)
        or os.path.isdir(model)
    )


def check_model_source(model: str, marker: str = "model_index.json") -> None:
    """Fail fast on a local model folder that is missing or incomplete (hub ids pass)."""
    if not model:
        raise ModelNotFoundError("no model given: pass a hub id like 'org/name' or a local folder")
    if not looks_like_path(model):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model folder {str(path)!r} does not exist. Pass an existing diffusers folder "
            "(one with model_index.json, as written by `pipeline.save_pretrained(...)`) or a hub id."
        )
    if marker and not (path / marker).is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is not a diffusers model folder: {marker} is missing. Point to the folder "
            "that `save_pretrained` wrote (it holds model_index.json, unet/, vae/, text_encoder/ ...)."
        )


def load_error(model: str, what: str, error: Exception) -> ModelNotFoundError:
    """A readable error for a failed `from_pretrained` of `what` from `model`."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return ModelNotFoundError(
        f"could not load the {what} of {model!r}: it is not a local folder and was not found in the "
        f"Hugging Face cache{' (HF_HUB_OFFLINE is set)' if offline else ' or on the Hub'}. Download it "
        "on a machine with internet (`hf download "
        f"{model}`) or pass a local folder written by `save_pretrained`. Original error: "
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    )


def torch_dtype(name: DType) -> torch.dtype:
    """torch dtype from its name."""
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16") from None


class Backbone(nn.Module, ABC):
    """A frozen text-to-image model behind one small protocol."""

    family: ClassVar[str]
    """Model family written into token files ("sd", "sdxl", "sd3")."""
    model: str
    """Hub id or local folder the weights come from."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width D of the text encoder's output states."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Sequence length S the text encoder is run at (77 for CLIP)."""

    @property
    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The model's own scheduler config, from which samplers build their scheduler."""

    @abstractmethod
    def load_tokenizer(self) -> None:
        """Load the tokenizer only (cheap)."""

    @abstractmethod
    def load(self) -> None:
        """Load every frozen part (idempotent)."""

    @abstractmethod
    def token_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Real tokens of each prompt without truncation, BOS and EOS included."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], reserved: int = 0, too_long: TooLong = "error") -> PromptEmbeds:
        """Encode prompts, leaving `reserved` positions of the sequence for learned tokens."""

    @abstractmethod
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the initial noise for images of height x width."""

    @abstractmethod
    def denoise(self, latents: Tensor, timestep: Tensor, hidden: Tensor) -> Tensor:
        """The denoiser's prediction for latents conditioned on hidden states."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] from latents (differentiable)."""

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen weights."""
        return torch_dtype(self.dtype_name)

    dtype_name: DType = "float32"
