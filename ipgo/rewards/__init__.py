"""Differentiable rewards: ``Reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]``, higher is better."""

from ipgo.rewards.aesthetic import Aesthetic
from ipgo.rewards.base import Reward, differentiable_preprocess
from ipgo.rewards.clip_score import ClipScore

__all__ = ["Aesthetic", "ClipScore", "Reward", "differentiable_preprocess"]
