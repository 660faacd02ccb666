"""ImageReward (Xu et al. 2023): a BLIP image-text encoder with an MLP head, trained on human choices.

The model is BLIP's ViT (ViT-L/16 at 224 px for the published weights) whose patch tokens the
BERT-base text encoder cross-attends to; the text encoder's first-token output goes through a
``768→1024→128→64→16→1`` MLP (no activations, the same layout as the LAION aesthetic head) and
the result is normalised as ``(r - 0.16717) / 1.03334``.

The published ``ImageReward.pt`` (Hugging Face repo ``THUDM/ImageReward``) is a plain state dict
with the ``image-reward`` package's names (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``). That package does not import with transformers 5, so the model is rebuilt here
from transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the pieces of
``BlipForImageTextRetrieval``) and the checkpoint is renamed key by key
(:func:`to_module_key` / :func:`to_imagereward_key`), the way transformers' BLIP conversion
renames LAVIS/BLIP weights.

Scoring follows ``ImageReward.score``: the prompt tokenised by ``bert-base-uncased`` (with the
``[DEC]`` and ``[ENC]`` tokens added, 30,524 tokens) padded to 35 tokens, the text encoder run
bidirectionally with the padding masked and the whole image attended to. Like the published
``score``/``inference_rank`` (and unlike BLIP's own ITM head) the first token stays ``[CLS]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipgo.backbones.base import ModelNotFoundError
from ipgo.errors import UserError
from ipgo.rewards.aesthetic import AestheticHead, WeightsFormatError
from ipgo.rewards.base import Reward, differentiable_preprocess, looks_local, weights_source
from ipgo.testing import is_tiny, resolve_source

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig, PreTrainedTokenizerBase

CHECKPOINT_NAME = "ImageReward.pt"
CONFIG_NAME = "config.json"
SCORE_MEAN = 0.16717362830052426
"""Mean of the raw MLP output over ImageReward's training data; subtracted from every score."""
SCORE_STD = 1.0333394966054072
"""Standard deviation of the raw MLP output; every score is divided by it."""
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35  # tokens, as in ImageReward.score

# The published sizes: BLIP "large" ViT (vit.py: eps 1e-6, qkv bias) and BLIP's med_config.json.
VISION_DEFAULTS: dict[str, Any] = dict(
    image_size=224, patch_size=16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, layer_norm_eps=1e-6, hidden_act="gelu",
)  # fmt: skip
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)  # fmt: skip
_MED_KEYS = {  # keys of BLIP's med_config.json (a BertConfig) that size the text encoder
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id",
}  # fmt: skip

_HINT = (
    f"Download {CHECKPOINT_NAME} from the Hugging Face repo THUDM/ImageReward (`hf download THUDM/ImageReward "
    f"{CHECKPOINT_NAME}`) on a machine with internet and pass its local path (or a folder holding it)."
)
_TOKENIZER_HINT = (
    "ImageReward uses the bert-base-uncased tokenizer: fetch it with `hf download bert-base-uncased` on a "
    "machine with internet and copy the Hugging Face cache over, or pass a folder with its tokenizer files "
    "(a folder given as the checkpoint is used when it holds tokenizer files)."
)

# ImageReward ViT names (timm style) <-> transformers BlipVisionModel names; {i} a block, {p} weight/bias.
_VISION_NAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)
# Prefixes: (ImageReward, ours). BLIP's med BERT and transformers' BlipTextModel share their names.
_PREFIXES = (("blip.visual_encoder.", "vision."), ("blip.text_encoder.", "text."), ("mlp.", "mlp."))
# In the published file but unused by the score: BLIP's contrastive projections, med's position_ids buffer.
_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids")


def _pattern(template: str) -> re.Pattern[str]:
    text = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", "(?P<p>weight|bias)")
    return re.compile(text)


_TO_OURS = tuple((_pattern(theirs), ours) for theirs, ours in _VISION_NAMES)
_TO_THEIRS = tuple((_pattern(ours), theirs) for theirs, ours in _VISION_NAMES)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


def to_module_key(key: str) -> str | None:
    """The :class:`ImageRewardModel` state-dict name of an ``ImageReward.pt`` key, or None if unknown."""
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            rest = key[len(theirs) :]
            inner = _rename(rest, _TO_OURS) if ours == "vision." else rest
            return None if inner is None else ours + inner
    return None


def to_imagereward_key(key: str) -> str | None:
    """The inverse of :func:`to_module_key`: the ``ImageReward.pt`` name of a module key, or None."""
    for theirs, ours in _PREFIXES:
        if key.startswith(ours):
            rest = key[len(ours) :]
            inner = _rename(rest, _TO_THEIRS) if ours == "vision." else rest
            return None if inner is None else theirs + inner
    return None


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BLIP text encoder + MLP head, with transformers modules.

    Args:
        vision: The ViT's config.
        text: The text encoder's config; ``is_decoder=True`` so that its layers have cross-attention
            (it is still run bidirectionally), ``encoder_hidden_size`` the ViT's width.
    """

    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = AestheticHead(text.hidden_size)

    def features(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text encoder's first-token output ``[B, D]`` for preprocessed ``pixels`` and tokens."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :]

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw (unnormalised) scores ``[B]``."""
        features = self.features(pixels, input_ids, attention_mask)
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype)).squeeze(-1)


def read_config(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ViT and text-encoder sizes: the published ones, updated from a JSON file.

    The file is either ``{"vision": {...}, "text": {...}}`` (``BlipVisionConfig`` /
    ``BlipTextConfig`` arguments) or BLIP's ``med_config.json`` (a BERT config: text sizes only).

    Returns:
        ``(vision_kwargs, text_kwargs)``; the text encoder's ``encoder_hidden_size`` is the ViT's width.

    Raises:
        UserError: If the file is not a JSON object of that form.
    """
    vision, text = dict(VISION_DEFAULTS), dict(TEXT_DEFAULTS)
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"ImageReward config {str(path)!r} could not be read as JSON: {err}") from err
        if not isinstance(data, dict):
            raise UserError(f"ImageReward config {str(path)!r}: expected a JSON object.")
        if "vision" in data or "text" in data:
            vision.update(data.get("vision") or {})
            text.update(data.get("text") or {})
        else:  # med_config.json
            text.update({k: v for k, v in data.items() if k in _MED_KEYS})
    text["encoder_hidden_size"] = vision["hidden_size"]
    return vision, text


def build_model(vision: Mapping[str, Any], text: Mapping[str, Any]) -> ImageRewardModel:
    """A randomly initialised :class:`ImageRewardModel` of the given sizes (see :func:`read_config`)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    text = {**text, "is_decoder": True, "use_cache": False}
    return ImageRewardModel(BlipVisionConfig(**vision), BlipTextConfig(**text))


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def map_state_dict(state: Mapping[str, Any], expected: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """Rename an ``ImageReward.pt`` state dict to :class:`ImageRewardModel` names and check it fully.

    Args:
        state: The checkpoint's state dict.
        expected: The model's own state dict (names and shapes).
        where: The checkpoint's name, for messages.

    Returns:
        The renamed state dict, exactly the keys of ``expected``.

    Raises:
        WeightsFormatError: On unknown keys, missing keys or wrong shapes, naming a few of them.
    """
    mapped: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _UNUSED.fullmatch(key):
            continue
        ours = to_module_key(key)
        if ours in expected:
            mapped[ours] = value
        else:
            unknown.append(key)
    missing = sorted(to_imagereward_key(k) or k for k in expected.keys() - mapped.keys())
    if unknown or missing:
        raise WeightsFormatError(
            f"ImageReward checkpoint {where!r} does not match the model: "
            f"missing keys [{_some(missing)}], unexpected keys [{_some(sorted(unknown))}]. "
            "Is it the published ImageReward.pt, and does the config give its sizes?"
        )
    for key, value in mapped.items():
        found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        shape = tuple(expected[key].shape)
        if found != shape:
            raise WeightsFormatError(
                f"ImageReward checkpoint {where!r}: {to_imagereward_key(key)} has shape {found}, expected {shape} "
                "(a different model size? pass its config)."
            )
    return mapped


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """BLIP's BERT tokenizer: ``source`` (Hub id or folder) with ``[DEC]`` (bos) and ``[ENC]`` added."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"ImageReward tokenizer {source!r} could not be loaded: {err}\n{_TOKENIZER_HINT}"
        ) from err
    if len(tokenizer) <= 3:  # transformers 5 builds an almost empty tokenizer when no files are found
        raise ModelNotFoundError(f"ImageReward tokenizer {source!r}: no tokenizer files found. {_TOKENIZER_HINT}")
    vocab = tokenizer.get_vocab()
    if "[DEC]" not in vocab:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward score of images against their prompts (higher is better; roughly -2 to 2).

    Args:
        checkpoint: Local path of ``ImageReward.pt``, or a folder holding it (and optionally
            ``config.json`` and tokenizer files), or ``"tiny:image-reward"`` in tests.
        tokenizer: Hub id or folder of the BERT tokenizer. When ``checkpoint`` is a folder with
            tokenizer files and this is left at its default, the folder's tokenizer is used.
        config: JSON with the model sizes (see :func:`read_config`); default the folder's
            ``config.json`` if there is one, else the published sizes (ViT-L/16 224 px, BERT-base).
    """

    name = "image_reward"

    def __init__(self, checkpoint: str, tokenizer: str = "bert-base-uncased", config: str | None = None) -> None:
        super().__init__()
        if is_tiny(checkpoint):
            self.checkpoint = checkpoint
        else:
            path = Path(checkpoint).expanduser()
            if path.is_dir() and not (path / CHECKPOINT_NAME).is_file():
                raise ModelNotFoundError(f"ImageReward: the folder {str(path)!r} has no {CHECKPOINT_NAME}. {_HINT}")
            if not path.exists():
                raise ModelNotFoundError(f"ImageReward checkpoint {str(path)!r} does not exist. {_HINT}")
            self.checkpoint = str(path)
        if config is not None:
            config = str(Path(config).expanduser())
            if not Path(config).is_file():
                raise ModelNotFoundError(f"ImageReward config {config!r} is not a file.")
        if looks_local(tokenizer):
            tokenizer = str(Path(tokenizer).expanduser())
            if not Path(tokenizer).exists():
                raise ModelNotFoundError(f"ImageReward tokenizer {tokenizer!r} does not exist. {_TOKENIZER_HINT}")
        self.tokenizer_source = tokenizer
        self.config_path = config
        self.model: ImageRewardModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._size = 224
        self.max_length = MAX_LENGTH

    @property
    def weights(self) -> str:
        return weights_source(self.checkpoint)

    def _files(self) -> tuple[Path, str | None, str]:
        """The checkpoint file, config file and tokenizer source, looking inside a folder checkpoint."""
        path = Path(resolve_source(self.checkpoint))
        config, tokenizer = self.config_path, self.tokenizer_source
        if path.is_dir():
            if config is None and (path / CONFIG_NAME).is_file():
                config = str(path / CONFIG_NAME)
            if tokenizer == "bert-base-uncased" and (path / "tokenizer_config.json").is_file():
                tokenizer = str(path)
            path = path / CHECKPOINT_NAME
        return path, config, tokenizer

    def _load(self) -> None:
        path, config, tokenizer_source = self._files()
        vision, text = read_config(config)  # the cheap files first: their errors come before the 1.7 GB read
        tokenizer = load_tokenizer(tokenizer_source)
        if len(tokenizer) != text["vocab_size"]:
            raise UserError(
                f"ImageReward: the tokenizer {tokenizer_source!r} has {len(tokenizer)} tokens with [DEC] and [ENC] "
                f"but the text encoder has {text['vocab_size']}; use bert-base-uncased's tokenizer."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise WeightsFormatError(
                f"ImageReward checkpoint {str(path)!r}: expected a state dict, found {type(state).__name__}."
            )
        text.update(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id)
        text.update(eos_token_id=tokenizer.sep_token_id)  # metadata only: the score never generates
        model = build_model(vision, text)
        model.load_state_dict(map_state_dict(state, model.state_dict(), str(path)), strict=True)
        self.model, self.tokenizer = model, tokenizer
        self._size = int(vision["image_size"])
        self.max_length = min(MAX_LENGTH, int(text["max_position_embeddings"]))

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Input ids and attention mask ``[B, 35]``, padded and truncated as ``ImageReward.score`` does."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self._where.device
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def features(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The text encoder's first-token output ``[B, D]``, the MLP's input; differentiable in ``images``."""
        pixels = differentiable_preprocess(images.float(), self._size, IMAGE_MEAN, IMAGE_STD,
                                           crop_rounding="nearest")  # its reference crops with torchvision
        input_ids, attention_mask = self.tokenize(prompts)
        return self.model.features(pixels.to(self._where.dtype), input_ids, attention_mask)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        features = self.features(images, prompts)
        raw = self.model.mlp(features.to(self.model.mlp.layers[0].weight.dtype)).squeeze(-1)
        return (raw - SCORE_MEAN) / SCORE_STD
