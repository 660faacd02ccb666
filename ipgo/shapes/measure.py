"""Oracle accuracy of a text-to-image model on shapes-world captions (evaluation only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ipgo.shapes.world import score


@torch.no_grad()
def oracle_accuracy(pipe: Any, captions: Sequence[str], seeds: Sequence[int], guidance_scale: float = 1.0,
                    num_steps: int = 20) -> dict[str, float]:
    """Mean oracle scores (colours, positions, shapes, all_correct) of `pipe`'s images, one per caption and seed."""
    totals = {"colours": 0.0, "positions": 0.0, "shapes": 0.0, "all_correct": 0.0}
    for caption in captions:
        images = pipe([caption] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                      num_inference_steps=num_steps, guidance_scale=guidance_scale, height=32, width=32,
                      output_type="pt").images
        for image in images:
            for key, value in vars(score(image.float().cpu(), caption)).items():
                totals[key] += value
    n = len(captions) * len(seeds)
    return {key: value / n for key, value in totals.items()}
