"""Measuring the shapes world's models on held-out captions (evaluation only): oracle accuracy and the
CLIP reward's AUC; `python -m ipgo.shapes.train --out DIR --measure` writes them to DIR/metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ipgo.shapes.world import caption_split, score

EVAL_SEEDS = (20_000, 20_001, 20_002, 20_003)


@torch.no_grad()
def sample(pipe: Any, captions: Sequence[str], seeds: Sequence[int], guidance_scale: float, steps: int = 20) -> Tensor:
    """Images (len(captions) * len(seeds), 3, 32, 32) of a shapes pipeline, caption-major."""
    return torch.cat([
        pipe([c] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds], height=32, width=32,
             num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt").images.float().cpu()
        for c in captions
    ])


def oracle_accuracy(images: Tensor, texts: Sequence[str]) -> dict[str, float]:
    """Mean oracle scores (colours, positions, shapes, all_correct) of images against their captions."""
    scores = [vars(score(image, text)) for image, text in zip(images, texts)]
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties count half); None
    without both (metrics.json writes it as null)."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def measure(out: str) -> dict[str, Any]:
    """Measure the targets of issue 7 on the models in `out` (sd/, clip/) into `out`/metrics.json:
    oracle accuracy on the held-out captions at guidance 1, 2, 3, 5 (DDIM 20 steps, 4 seeds), and the
    CLIP reward's AUC at telling oracle-correct from incorrect samples at the default guidance."""
    from diffusers import StableDiffusionPipeline

    from ipgo.rewards import ClipScore
    from ipgo.shapes.train import GUIDANCE

    root = Path(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    _, held_out = caption_split()
    texts = [c for c in held_out for _ in EVAL_SEEDS]
    metrics: dict[str, Any] = {"held_out_captions": len(held_out), "seeds": list(EVAL_SEEDS),
                               "sampler": f"{type(pipe.scheduler).__name__} 20 steps", "accuracy": {}}
    samples = {}
    for guidance in (1.0, 2.0, 3.0, 5.0):
        samples[guidance] = sample(pipe, held_out, EVAL_SEEDS, guidance)
        metrics["accuracy"][str(guidance)] = oracle_accuracy(samples[guidance], texts)
    images = samples[GUIDANCE]
    reward = ClipScore(str(root / "clip"))
    reward.load()
    with torch.no_grad():
        clip_scores = reward(images, texts).tolist()
    correct = [score(image, text).all_correct == 1.0 for image, text in zip(images, texts)]
    metrics["default_guidance"] = GUIDANCE
    metrics["clip_auc_generated_held_out"] = auc(clip_scores, correct)
    metrics["generated_correct_at_default_guidance"] = sum(correct) / len(correct)
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics
