"""Differentiable rewards: ``Reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]``, higher is better."""

from ipgo.rewards.aesthetic import Aesthetic
from ipgo.rewards.base import Reward, differentiable_preprocess
from ipgo.rewards.clip_score import ClipScore
from ipgo.rewards.combine import (
    REWARDS,
    CombinedReward,
    RewardSpec,
    RewardTerm,
    UnknownRewardError,
    build_reward,
    reward_class,
)
from ipgo.rewards.hps import HPSv2
from ipgo.rewards.image_reward import ImageReward
from ipgo.rewards.pickscore import PickScore
from ipgo.rewards.shapes_oracle import ShapesOracle

__all__ = [
    "REWARDS",
    "Aesthetic",
    "ClipScore",
    "CombinedReward",
    "HPSv2",
    "ImageReward",
    "PickScore",
    "Reward",
    "RewardSpec",
    "RewardTerm",
    "ShapesOracle",
    "UnknownRewardError",
    "build_reward",
    "differentiable_preprocess",
    "reward_class",
]
