"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic human preferences.

The score is ``logit_scale.exp() * cos(image, text)`` (about 20-23 for real images), computed
with transformers' ``CLIPModel`` from ``yuvalkirstain/PickScore_v1`` and the image processor and
tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as in the PickScore paper.
"""

from __future__ import annotations

from torch import Tensor

from ipgo.backbones.base import ModelNotFoundError
from ipgo.rewards.base import (
    _CLIP_HINT,
    _missing_model_message,
    check_source,
    image_resize,
    load_clip_processing,
    weights_source,
)
from ipgo.rewards.clip_score import ClipScore
from ipgo.testing import resolve_source


class PickScore(ClipScore):
    """PickScore of images against their prompts (higher is better).

    Args:
        model: Hub id or local folder of the PickScore ``CLIPModel`` weights.
        processor: Hub id or local folder with the image processor and tokenizer files
            (the model's weights are not read from it).
    """

    name = "pickscore"

    def __init__(
        self, model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    ) -> None:
        super().__init__(model)
        self.processor = check_source(processor, "CLIP processor", hint=_CLIP_HINT)

    @property
    def weights(self) -> str:
        return f"{super().weights} (processor {weights_source(self.processor)})"  # its preprocessing sets the scores

    def _load(self) -> None:
        from transformers import CLIPModel

        model, source = resolve_source(self.clip_model), resolve_source(self.processor)
        processor, tokenizer = load_clip_processing(source)  # the small files first: a gap fails before 3.9 GB load
        try:
            clip = CLIPModel.from_pretrained(model)
        except OSError as err:
            raise ModelNotFoundError(_missing_model_message(model, err)) from err
        self.clip, self.tokenizer = clip.eval(), tokenizer
        self._size, self._crop, self._fit = image_resize(processor)
        self._mean, self._std = tuple(processor.image_mean), tuple(processor.image_std)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.clip.logit_scale.exp().float() * super()._score(images, prompts)
