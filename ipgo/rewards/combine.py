"""A weighted sum of rewards, each optionally normalised, and the registry of reward names.

``loss = -CombinedReward(images, prompts)`` trains on all terms at once; after each call,
``components`` holds every term's raw scores for logging.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ipgo.errors import UserError
from ipgo.rewards.aesthetic import Aesthetic
from ipgo.rewards.base import Reward
from ipgo.rewards.clip_score import ClipScore
from ipgo.rewards.hps import HPSv2
from ipgo.rewards.image_reward import ImageReward
from ipgo.rewards.pickscore import PickScore
from ipgo.rewards.shapes_oracle import ShapesOracle

Normalize = Literal["none", "running", "fixed"]

REWARDS: dict[str, type[Reward]] = {
    "clip_score": ClipScore,
    "aesthetic": Aesthetic,
    "hpsv2": HPSv2,
    "pickscore": PickScore,
    "image_reward": ImageReward,
    "shapes_oracle": ShapesOracle,
}
"""Reward classes by the names configs use."""


class UnknownRewardError(UserError, ValueError):
    """A reward name that is not in ``REWARDS``."""


class RewardConfigError(UserError, ValueError):
    """A reward term with an invalid setting."""


@dataclass
class RewardSpec:
    """A reward chosen by name in a config, e.g. `{name: hpsv2, weight: 0.5, args: {checkpoint: HPS_v2.1.pt}}`."""

    name: str
    """Registry name: clip_score, aesthetic, hpsv2, pickscore, image_reward (or shapes_oracle, to judge only)."""
    weight: float = 1.0
    """Factor of this reward in the sum."""
    normalize: Normalize = "none"
    """none, fixed ((r - offset) / scale) or running ((r - mean) / std of the scores seen)."""
    offset: float = 0.0
    """Subtracted before scaling with normalize=fixed."""
    scale: float = 1.0
    """Divisor with normalize=fixed."""
    args: dict[str, Any] = field(default_factory=dict)
    """Arguments of the reward class (model ids, checkpoint paths)."""


def build_reward(specs: Sequence[RewardSpec]) -> CombinedReward:
    """A `CombinedReward` from named specs; clear errors for unknown names and wrong arguments."""
    if not specs:
        raise RewardConfigError("the reward list is empty: name at least one reward")
    terms = []
    for spec in specs:
        cls = reward_class(spec.name)
        try:
            inspect.signature(cls).bind(**spec.args)
        except TypeError as error:
            accepted = ", ".join(inspect.signature(cls).parameters)
            raise RewardConfigError(f"reward {spec.name!r}: {error}; its arguments are {accepted}") from None
        terms.append(RewardTerm(cls(**spec.args), spec.weight, spec.normalize, spec.offset, spec.scale))
    return CombinedReward(terms)


def reward_class(name: str) -> type[Reward]:
    """The reward class registered under ``name``.

    Raises:
        UnknownRewardError: If ``name`` is not registered; the message lists the known names.
    """
    try:
        return REWARDS[name]
    except KeyError:
        raise UnknownRewardError(f"unknown reward {name!r}; the known rewards are {', '.join(REWARDS)}") from None


@dataclass
class RewardTerm:
    """One term of a ``CombinedReward``.

    Attributes:
        reward: The reward to score with.
        weight: Its factor in the sum.
        normalize: ``"none"``: raw scores; ``"fixed"``: ``(r - offset) / scale``; ``"running"``:
            ``(r - mean) / std`` with the running statistics of every score seen so far.
        offset: Subtracted before scaling when ``normalize="fixed"``.
        scale: Divisor when ``normalize="fixed"``; must not be zero.
    """

    reward: Reward
    weight: float = 1.0
    normalize: Normalize = "none"
    offset: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.normalize not in get_args(Normalize):
            raise RewardConfigError(
                f"normalize must be one of {', '.join(get_args(Normalize))}, got {self.normalize!r}"
            )
        if self.normalize == "fixed" and self.scale == 0:
            raise RewardConfigError(f"reward {self.reward.name!r}: normalize='fixed' needs a non-zero scale")


@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations of all scores seen (Chan et al.'s batch update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = field(default=0.0)

    def update(self, values: Tensor) -> None:
        """Add a batch of scores (non-finite ones are left out: they end training, and must not end the statistics)."""
        values = values.detach().double().flatten()
        values = values[values.isfinite()]
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Sample standard deviation; 1.0 until two scores are seen or when they are all equal."""
        if self.count < 2:
            return 1.0
        std = math.sqrt(self.m2 / (self.count - 1))
        return std if std > 1e-8 else 1.0


class CombinedReward(Reward):
    """Weighted sum of rewards with per-term normalisation.

    Running statistics (``normalize="running"``) are updated on every call while
    ``update_statistics`` is true, before the batch is normalised: a batch is scaled with
    statistics that include it (so the first batch is centred on its own mean). Scoring that
    must not move them (validation, reports) runs inside `frozen_statistics`. The statistics
    live in ``stats`` (plain floats; `IPGOModule` keeps them in its checkpoints). Totals from
    different calls sit on different scales while the statistics move: `combine` puts stored
    raw components on today's scale to compare them.

    Args:
        rewards: The terms; components are named by their reward's ``name`` (``_2``, ``_3``, ...
            appended to repeats).
    """

    name = "combined"

    def __init__(self, rewards: Sequence[RewardTerm]) -> None:
        super().__init__()
        if not rewards:
            raise RewardConfigError("CombinedReward needs at least one reward term")
        self.terms = list(rewards)
        self.rewards = nn.ModuleList(term.reward for term in self.terms)
        self.names: list[str] = []
        for term in self.terms:
            name, i = term.reward.name, 2
            while name in self.names:
                name, i = f"{term.reward.name}_{i}", i + 1
            self.names.append(name)
        self.stats = {name: RunningStats() for name in self.names}
        self.update_statistics = True
        self.differentiable = all(term.reward.differentiable for term in self.terms if term.weight != 0)
        self.components: dict[str, Tensor] = {}

    def _load(self) -> None:
        for reward in self.rewards:
            reward.load()

    def check(self, prompts: Sequence[str], height: int, width: int) -> None:
        for reward in self.rewards:
            reward.check(prompts, height, width)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        total: Tensor | None = None
        self.components = {}
        for name, term in zip(self.names, self.terms):
            if term.weight == 0:  # only logged: no gradient, and it must not move the total (0 * NaN is NaN)
                with torch.no_grad():
                    self.components[name] = term.reward(images, prompts)
                continue
            raw = term.reward(images, prompts)
            self.components[name] = raw.detach()
            total_term = term.weight * self._normalize(name, term, raw)
            total = total_term if total is None else total + total_term
        return total if total is not None else images.new_zeros(len(prompts))

    def combine(self, components: Tensor) -> Tensor:
        """The weighted, normalised sum (...) of raw component scores (..., terms), on the current statistics
        and without updating them."""
        return sum((term.weight * self._normalize(name, term, components[..., k], update=False)
                    for k, (name, term) in enumerate(zip(self.names, self.terms)) if term.weight != 0),
                   components.new_zeros(components.shape[:-1]))

    def _normalize(self, name: str, term: RewardTerm, raw: Tensor, update: bool = True) -> Tensor:
        if term.normalize == "fixed":
            return (raw - term.offset) / term.scale
        if term.normalize == "running":
            if update and self.update_statistics:
                self.stats[name].update(raw)
            stats = self.stats[name]
            return (raw - stats.mean) / stats.std
        return raw


def uses_running_statistics(reward: Reward) -> bool:
    """Whether `reward` normalises any term with running statistics (which move with every batch scored)."""
    return isinstance(reward, CombinedReward) and any(term.normalize == "running" and term.weight != 0
                                                      for term in reward.terms)


@contextmanager
def frozen_statistics(reward: Reward) -> Iterator[None]:
    """Score with `reward` without moving its running normalisation statistics (if it has any)."""
    if not isinstance(reward, CombinedReward):
        yield
        return
    previous, reward.update_statistics = reward.update_statistics, False
    try:
        yield
    finally:
        reward.update_statistics = previous
