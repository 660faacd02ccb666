"""CLIP score: cosine similarity between an image and its prompt in CLIP's joint space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ipgo.rewards.base import ClipReward, _vector


class ClipScore(ClipReward):
    """Cosine similarity of CLIP image and text embeddings, in ``[-1, 1]`` (not scaled by 100).

    Args:
        model: Hub id or local folder of a transformers CLIP model with processor and tokenizer.
    """

    name = "clip_score"

    def __init__(self, model: str = "openai/clip-vit-large-patch14") -> None:
        super().__init__(model)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """CLIP text embeddings ``[B, D]`` (constant, cached per prompt)."""

        def encode(texts: list[str]) -> Tensor:
            max_length = self.clip.config.text_config.max_position_embeddings
            tokens = self.tokenizer(
                texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self._where.device)
            return _vector(self.clip.get_text_features(**tokens))

        return self.text_rows(prompts, encode)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        image = self.image_features(images)
        text = self.text_features(prompts).to(device=image.device, dtype=image.dtype)
        return F.cosine_similarity(image.float(), text.float(), dim=-1)
