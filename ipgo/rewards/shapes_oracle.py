"""The shapes world's exact oracle as a judge: 1.0 where an image shows what its caption says, else 0.0.

Not differentiable (it thresholds pixels), so it can judge (`model.judges`, `ipgo.evaluate
--rewards`) but never be optimised; `IPGOModule` refuses it as a training reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ipgo.errors import UserError
from ipgo.rewards.base import Reward
from ipgo.shapes.world import parse, score

Aspect = Literal["all_correct", "colours", "positions", "shapes"]


class ShapesOracle(Reward):
    """Oracle score of shapes-world images against their captions (evaluation only).

    Args:
        aspect: which check to return: every item right ("all_correct"), or only "colours",
            "positions" (which sides are occupied) or "shapes".
    """

    name = "shapes_oracle"
    differentiable = False

    def __init__(self, aspect: Aspect = "all_correct") -> None:
        super().__init__()
        if aspect not in ("all_correct", "colours", "positions", "shapes"):
            raise UserError(f"shapes_oracle: unknown aspect {aspect!r}; choose all_correct, colours, positions or "
                            "shapes")
        self.aspect = aspect

    def check(self, prompts: Sequence[str], height: int, width: int) -> None:
        if (height, width) != (32, 32):
            raise UserError(f"shapes_oracle reads 32 x 32 shapes-world images, got {height} x {width}: render at "
                            "height=32, width=32")
        for prompt in dict.fromkeys(prompts):
            try:
                parse(prompt)
            except ValueError as error:
                raise UserError(f"shapes_oracle judges shapes-world captions only: {error}") from None

    def _load(self) -> None:
        pass

    @torch.no_grad()
    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        self.check(prompts, *images.shape[-2:])
        values = [getattr(score(image.detach().float().cpu(), prompt), self.aspect)
                  for image, prompt in zip(images, prompts)]
        return torch.tensor(values, device=images.device)
