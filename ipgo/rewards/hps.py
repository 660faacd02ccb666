"""HPSv2 / HPSv2.1: human preference score, an open_clip ViT-H-14 fine-tuned on human choices.

The score is the cosine similarity of the image and prompt embeddings (HPSv2's
``diag(image_features @ text_features.T)`` with normalised features; roughly 0.2-0.3 for real
images). The published ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` have open_clip's
state-dict keys and load through ``open_clip.create_model("ViT-H-14", pretrained=path)``, which
accepts a plain state dict or ``{"state_dict": ...}``; the ``hpsv2`` package is not needed.

A custom open_clip architecture can be used by putting its config, ``<model_name>.json``, next
to the checkpoint: it is registered with ``open_clip.add_model_config`` before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ipgo.backbones.base import ModelNotFoundError
from ipgo.rewards.aesthetic import WeightsFormatError
from ipgo.rewards.base import Reward, differentiable_preprocess, weights_source
from ipgo.testing import is_tiny, resolve_source

_HPS_HINT = (
    "Download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from the Hugging Face repo "
    "xswu/HPSv2 on a machine with internet and pass its local path."
)


def _check_model_name(model_name: str, checkpoint: Path) -> Path:
    """The open_clip config file a model name needs beside the checkpoint; refuses a name open_clip does not know."""
    import open_clip

    config = checkpoint.with_name(f"{model_name}.json")
    if model_name not in open_clip.list_models() and not config.is_file():
        raise ModelNotFoundError(
            f"HPSv2: unknown open_clip model {model_name!r} (use 'ViT-H-14', or put {model_name}.json next to the "
            "checkpoint)."
        )
    return config


class HPSv2(Reward):
    """Human Preference Score v2 of images against their prompts (higher is better).

    Args:
        checkpoint: Local path of the HPSv2 ``.pt`` checkpoint (or ``"tiny:hps"`` in tests).
        model_name: open_clip architecture of the checkpoint (``ViT-H-14`` for HPSv2 and v2.1).
    """

    name = "hpsv2"

    def __init__(self, checkpoint: str, model_name: str = "ViT-H-14") -> None:
        super().__init__()
        if is_tiny(checkpoint):
            self.checkpoint = checkpoint
        else:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"HPSv2 checkpoint {str(path)!r} is not a file. {_HPS_HINT}")
            self.checkpoint = str(path)
            _check_model_name(model_name, path)
        self.model_name = model_name
        self.model: Any = None
        self.tokenizer: Any = None
        self._size = 224
        self._mean: tuple[float, ...] = ()
        self._std: tuple[float, ...] = ()

    @property
    def weights(self) -> str:
        return f"{weights_source(self.checkpoint)} ({self.model_name})"

    def _load(self) -> None:
        import open_clip

        path = Path(resolve_source(self.checkpoint))
        config = _check_model_name(self.model_name, path)
        if self.model_name not in open_clip.list_models():
            open_clip.add_model_config(config)
        try:
            model = open_clip.create_model(self.model_name, pretrained=str(path), require_pretrained=True)
        except (RuntimeError, AssertionError, KeyError) as err:  # key/shape mismatches in open_clip's loader
            raise WeightsFormatError(
                f"HPSv2 checkpoint {str(path)!r} does not fit the open_clip model {self.model_name!r} "
                f"(HPSv2 and v2.1 are ViT-H-14): {type(err).__name__}: {err}"
            ) from err
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        size = model.visual.image_size
        self._size = int(size if isinstance(size, int) else size[0])
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        self._mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self._std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """Normalised text embeddings ``[B, D]`` (constant, cached per prompt)."""

        def encode(texts: list[str]) -> Tensor:
            return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self._where.device)).float(), dim=-1)

        return self.text_rows(prompts, encode)

    def image_features(self, images: Tensor) -> Tensor:
        """Normalised image embeddings ``[B, D]`` in float32, differentiable in ``images``."""
        # HPSv2 scores with open_clip's resize_longest_max transform: the whole image, padded to a square
        pixels = differentiable_preprocess(images.float(), self._size, self._mean, self._std, fit="pad")
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        image = self.image_features(images)
        text = self.text_features(prompts).to(image.device)
        return (image * text).sum(-1)
