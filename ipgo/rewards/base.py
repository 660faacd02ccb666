"""The reward interface: frozen, differentiable scorers of images against their prompts.

A reward maps images ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts to scores ``[B]``;
higher is better. Training minimises ``loss = -Σ weight · reward + penalties``, so gradients
must reach the pixels: preprocessing is tensor-only (never PIL) and the weights are frozen.

Weights are not loaded in ``__init__`` (building a config or ``--help`` stays cheap); only
names and paths are stored and checked. ``load()`` reads them, on the module's current
device and dtype, and may be called again at no cost.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipgo.backbones.base import ModelNotFoundError
from ipgo.caching import cached
from ipgo.errors import UserError
from ipgo.testing import is_tiny, resolve_source

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
_CLIP_HINT = (
    "Pass a Hub id (e.g. 'openai/clip-vit-large-patch14') or a folder made with save_pretrained "
    "(config.json, weights, preprocessor_config.json, tokenizer files)."
)


class Reward(nn.Module):
    """Base class: subclasses set ``name`` and implement ``_load`` and ``_score``."""

    name: str = "reward"
    differentiable: bool = True
    """False for judges (e.g. an exact oracle) that can score but not be optimised."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False
        # Moves with .to()/.half(), so weights loaded later land where the module already is.
        self.register_buffer("_where", torch.empty(0), persistent=False)
        self._text_cache: dict[str, Tensor] = {}

    @property
    def weights(self) -> str:
        """Where the reward's weights come from (Hub ids, local paths made absolute), which tells two rewards of
        one name apart; empty for a reward without weights."""
        return ""

    @property
    def loaded(self) -> bool:
        """Whether ``load()`` has run."""
        return self._loaded

    def load(self) -> None:
        """Load the weights (once), frozen and in eval mode, on the module's device and dtype."""
        if self._loaded:
            return
        self._load()
        self._text_cache.clear()
        self.requires_grad_(False)
        self.to(device=self._where.device, dtype=self._where.dtype)
        self.eval()
        self._loaded = True

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Reward:
        self._text_cache.clear()  # cached features stay on the device and dtype they were computed on
        return super()._apply(fn, *args, **kwargs)

    def text_rows(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
        """Per-prompt text features (B, D), each encoded once (they do not depend on the pixels)."""
        return torch.stack(cached(self._text_cache, prompts, encode, limit=4096))

    def train(self, mode: bool = True) -> Reward:
        """Stay in eval mode: a frozen reward never runs dropout, whatever its parent does."""
        return super().train(False)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score images against their prompts.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``; gradients flow back to them.
            prompts: ``B`` prompts, one per image.

        Returns:
            ``[B]`` float32 scores, higher is better.
        """
        if not self._loaded:
            raise RuntimeError(f"{type(self).__name__}: call .load() before scoring (weights load lazily).")
        who = type(self).__name__
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{who}: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{who}: {images.shape[0]} images but {len(prompts)} prompts.")
        return self._score(images, list(prompts)).float()

    def check(self, prompts: Sequence[str], height: int, width: int) -> None:
        """Refuse, before anything loads, prompts or an image size this reward cannot score (default: any fit)."""

    def _load(self) -> None:
        raise NotImplementedError

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError


class ClipReward(Reward):
    """Base for rewards built on a transformers ``CLIPModel``: loading and image embeddings."""

    def __init__(self, clip_model: str) -> None:
        super().__init__()
        self.clip_model = check_source(clip_model, "CLIP model", hint=_CLIP_HINT)
        self.clip: CLIPModel | None = None
        self.tokenizer: CLIPTokenizer | None = None
        self._size = self._crop = 224
        self._fit: Literal["crop", "stretch"] = "crop"
        self._mean: Sequence[float] = ()
        self._std: Sequence[float] = ()

    crop_rounding: ClassVar[Literal["down", "nearest"]] = "down"
    """How the centre crop's offset rounds: down as CLIPImageProcessor, or to nearest as torchvision's CenterCrop
    (the preprocessing of the original OpenAI CLIP)."""

    @property
    def weights(self) -> str:
        return weights_source(self.clip_model)

    def _load(self) -> None:
        self.clip, processor, self.tokenizer = load_clip(self.clip_model)
        self._size, self._crop, self._fit = image_resize(processor)
        self._mean, self._std = tuple(processor.image_mean), tuple(processor.image_std)

    @property
    def projection_dim(self) -> int:
        """Width of the CLIP embeddings (768 for ViT-L/14)."""
        if self.clip is None:
            raise RuntimeError(f"{type(self).__name__}: call .load() first.")
        return int(self.clip.config.projection_dim)

    def image_features(self, images: Tensor) -> Tensor:
        """Projected CLIP image embeddings ``[B, D]`` (not normalised), differentiable in ``images``."""
        pixels = differentiable_preprocess(images.float(), self._size, self._mean, self._std, self._crop, self._fit,
                                           self.crop_rounding)
        return _vector(self.clip.get_image_features(pixel_values=pixels.to(self.clip.dtype)))


def image_resize(processor: Any) -> tuple[int, int, Literal["crop", "stretch"]]:
    """`(size, crop_size, fit)` of a CLIP image processor for `differentiable_preprocess`: a `shortest_edge` size
    keeps the aspect ratio (CLIP's processors); a `height` and `width` alone stretch the image to them, as
    transformers does."""
    size, crop = _size_value(processor.size, "shortest_edge"), _size_value(processor.crop_size, "height")
    height, width = _size_value(processor.size, "height"), _size_value(processor.size, "width")
    if size is None and height is not None:
        if height != width:
            raise UserError(f"the CLIP image processor resizes to {height} x {width}, not a square: ipgo's rewards "
                            "take square inputs; use a processor whose size is shortest_edge or a square")
        cropped = crop if getattr(processor, "do_center_crop", True) and crop else height
        return height, min(cropped, height), "stretch"
    crop = crop or size or 224
    return size or crop, crop, "crop"


def _size_value(size: object, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _vector(output: object) -> Tensor:
    """The embedding from ``get_*_features``: a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def differentiable_preprocess(
    images: Tensor, size: int, mean: Sequence[float], std: Sequence[float], crop_size: int | None = None,
    fit: Literal["crop", "pad", "stretch"] = "crop", crop_rounding: Literal["down", "nearest"] = "down",
) -> Tensor:
    """CLIP-style preprocessing with tensor ops only, so gradients reach the pixels.

    ``fit="crop"`` (CLIP's processors): resizes the shortest side to ``size`` (bicubic, antialiased; the long side
    rounds down as in ``CLIPImageProcessor``) and centre-crops to ``crop_size`` (default ``size``); the crop's
    offset rounds down as in ``CLIPImageProcessor`` or, with ``crop_rounding="nearest"``, as torchvision's
    ``CenterCrop``. ``fit="stretch"``: resizes to ``size`` square, whatever the aspect ratio, then centre-crops.
    ``fit="pad"`` (open_clip's ``resize_mode="longest"``, which HPSv2 scores with): resizes the longest side to
    ``size`` and pads the short one with black to a centred square. Then normalises.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        size: Target length of the shortest side (crop) or of the longest (pad).
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        crop_size: Side of the square centre crop; at most ``size`` (crop only).
        fit: "crop", "stretch" or "pad", see above.
        crop_rounding: "down" or "nearest", see above.

    Returns:
        ``[B, 3, side, side]`` normalised images (side: ``crop_size`` or ``size``), same dtype as ``images``.
    """
    h, w = images.shape[-2:]
    if fit == "pad" and crop_size is not None:
        raise ValueError("crop_size applies to fit='crop' only: a padded image is `size` square")
    if fit == "pad":
        scale = size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
    else:
        crop = size if crop_size is None else crop_size
        if crop > size:
            raise ValueError(f"crop_size {crop} is larger than the resized shortest side {size}.")
        new_h, new_w = (size, size) if fit == "stretch" else \
            (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, (new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    if fit == "pad":
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        if crop_rounding == "nearest":
            top, left = int(round((new_h - crop) / 2)), int(round((new_w - crop) / 2))
        else:
            top, left = (new_h - crop) // 2, (new_w - crop) // 2
        images = images[..., top : top + crop, left : left + crop]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def looks_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as a filesystem path rather than a Hub id like ``owner/name``."""
    text = os.fspath(source)
    return (
        isinstance(source, Path)
        or text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or re.match(r"^[A-Za-z]:", text) is not None
        or Path(text).suffix.lower() in _WEIGHT_SUFFIXES
    )


def weights_source(source: str) -> str:
    """`source` as recorded to compare with another: an existing local path made absolute (from_pretrained reads a
    folder before the Hub, so also `models/clip`), a Hub or tiny id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if not is_tiny(source) and (path.exists() or looks_local(source)) else source


def check_source(source: str | os.PathLike, what: str, hint: str = "") -> str:
    """Fail early on a local-looking path that does not exist; pass Hub ids through.

    Args:
        source: A Hub id or a local path.
        what: What the source is for, used in the message.
        hint: How to obtain the files, appended to the message.

    Returns:
        ``source`` as a string, with ``~`` expanded for local paths.

    Raises:
        FileNotFoundError: If ``source`` looks local and does not exist.
    """
    text = os.fspath(source)
    if is_tiny(text) or not looks_local(source):
        return text
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{what}: {str(path)!r} does not exist. {hint}".strip())
    return str(path)


def load_clip(model: str) -> tuple[CLIPModel, CLIPImageProcessor, CLIPTokenizer]:
    """Load a transformers CLIP model with its image processor and tokenizer.

    Honours ``HF_HUB_OFFLINE=1`` (no network then) and the local Hub cache.

    Args:
        model: A Hub id (``openai/clip-vit-large-patch14``) or a local folder.

    Returns:
        ``(model, processor, tokenizer)``; the model in eval mode, on CPU.

    Raises:
        OSError: If the files are not found, with the ways to provide them.
    """
    from transformers import CLIPModel

    model = resolve_source(model)
    processor, tokenizer = load_clip_processing(model)  # the small files first: a gap fails before the weights
    try:
        clip = CLIPModel.from_pretrained(model)
    except OSError as err:
        raise ModelNotFoundError(_missing_model_message(model, err)) from err
    return clip.eval(), processor, tokenizer


def load_clip_processing(source: str) -> tuple[CLIPImageProcessor, CLIPTokenizer]:
    """The image processor and tokenizer of a CLIP model folder or hub id (no weights)."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    try:
        processor = CLIPImageProcessor.from_pretrained(source)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelNotFoundError(_missing_model_message(source, err)) from err
    # transformers 5 silently builds a 2-token tokenizer when no tokenizer files are found.
    if len(tokenizer) <= 3:
        raise ModelNotFoundError(_missing_model_message(source, "no tokenizer files (tokenizer.json / vocab.json)"))
    return processor, tokenizer


def _missing_model_message(model: str, cause: object) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

    folder = "a local folder holding config.json, the weights, preprocessor_config.json and the tokenizer files"
    if looks_local(model):
        return f"Could not load the CLIP model from the folder {model!r}: {cause}\nPoint it at {folder}."
    offline = " (offline mode: HF_HUB_OFFLINE is set)" if is_offline_mode() else ""
    return (
        f"Could not load the CLIP model {model!r} from the Hugging Face cache {HF_HUB_CACHE}{offline}: {cause}\n"
        f"Provide it as {folder}, or fetch it on a machine with internet with `hf download {model}` (formerly "
        f"`huggingface-cli download`) and copy the cache over (or point HF_HOME / HF_HUB_CACHE at it)."
    )
