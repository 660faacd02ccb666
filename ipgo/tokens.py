"""Learnable prefix and suffix tokens: rotation x orthonormal basis x bounded coefficients.

A token set has two sides, prefix P (n_prefix x D) and suffix Q (n_suffix x D), living in
the text encoder's *output* space of width D. Each side is parameterised as

    token_i = R(theta_i) · E · z_i  (+ c)

    E = qr(W).Q · sign(diag(qr(W).R))   D x m, E^T E = I  (hard: holds at every step)
    z_i in [-b, b]^m                     coefficients, projected back after every optimiser
                                         step, so a coefficient at the bound keeps its true
                                         gradient and can move back inside
    R(theta_i) = G_{a-1}(theta_{i,a-1}) ··· G_0(theta_{i,0})
    G_k(phi)   rotates every coordinate pair by the angle phi: pairs (2j, 2j+1) for even k,
               pairs (2j+1, 2j+2 mod D) for odd k. Each G_k is a product of disjoint Givens
               rotations, so R is orthogonal: it turns a token, never changes its norm.
    c          an optional free bias (the published notebook has one)

Angles need no constraint (R is 2*pi periodic) and start at 0 (R = I; E is random already, so a
random first rotation would add nothing; the notebook draws them in [-pi, pi], but its rotation
never ran). Many independent token sets (prompt-wise
optimisation) are computed in one batched call by stacking their parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ipgo.errors import ConfigError

InitKind = Literal["uniform", "normal", "zeros"]


@dataclass
class TokenConfig:
    """Shape and constraints of one token set (a prefix and a suffix)."""

    n_prefix: int = 10
    """Number of learned tokens placed before the prompt's tokens (0 disables the prefix)."""
    n_suffix: int = 10
    """Number of learned tokens placed after the prompt's tokens (0 disables the suffix)."""
    rank: int = 32
    """Columns m of the orthonormal basis E (D x m) of each side; must not exceed D. Before rotation a side's n
    tokens lie in E's m-dimensional span, so only m < n limits the rank of their matrix; the notebook's m = 300
    for 10 tokens is an over-complete dictionary, not a low-rank constraint."""
    bound: float = 1.0
    """Range b of the coefficients: every z stays in [-b, b]."""
    rotation_angles: int = 2
    """Angles per token of the rotation R (0 turns the rotation off); they start at 0, R = I."""
    bias: bool = False
    """Add a free bias vector to each side's tokens (the notebook does)."""
    init: InitKind = "uniform"
    """Coefficient init: uniform in [-s*b, s*b], normal with std s*b (clipped), or zeros."""
    init_scale: float = 1.0
    """The scale s of the coefficient init."""
    seed: int = 0
    """Seed of the init; token set k of a prompt-wise run uses seed + k."""

    def __post_init__(self) -> None:
        if self.n_prefix < 0 or self.n_suffix < 0:
            raise ConfigError(f"n_prefix and n_suffix must be >= 0, got {self.n_prefix}, {self.n_suffix}")
        if self.n_prefix + self.n_suffix == 0:
            raise ConfigError("n_prefix + n_suffix is 0: there is nothing to learn; set at least one > 0")
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.bound <= 0:
            raise ConfigError(f"bound must be > 0, got {self.bound}")
        if not 0 <= self.init_scale <= 1:
            raise ConfigError(
                f"init_scale must be in [0, 1], got {self.init_scale}: initial coefficients would start outside "
                "the bound |z| <= bound (to start wider, raise bound)"
            )
        if self.rotation_angles < 0:
            raise ConfigError(f"rotation_angles must be >= 0, got {self.rotation_angles}")

    @classmethod
    def notebook(cls) -> TokenConfig:
        """The published notebook's shapes: 10 + 10 tokens, m = 300, bias, no rotation.

        (The notebook's rotation never ran; `configs/tokens/notebook.yaml` holds the same values.)
        """
        return cls(n_prefix=10, n_suffix=10, rank=300, bound=1.0, rotation_angles=0, bias=True)


def orthonormal_basis(weight: Tensor) -> Tensor:
    """Orthonormal columns spanning `weight` (..., D, m), continuous in `weight`."""
    q, r = torch.linalg.qr(weight)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def rotate(tokens: Tensor, angles: Tensor) -> Tensor:
    """Apply R(theta) to tokens (..., D) with angles (..., a); see the module docstring. The a factors G_k do not
    commute, so they are applied one after another (a = 2 by default), each at once to every set, token and pair."""
    dim = tokens.shape[-1]
    if dim % 2:
        raise ConfigError(f"the rotation needs an even hidden size, got {dim}")
    for k in range(angles.shape[-1]):
        cos, sin = torch.cos(angles[..., k, None]), torch.sin(angles[..., k, None])
        x = tokens if k % 2 == 0 else torch.roll(tokens, shifts=-1, dims=-1)
        pairs = x.unflatten(-1, (dim // 2, 2))  # (..., D/2, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        x = torch.stack((cos * first - sin * second, sin * first + cos * second), dim=-1).flatten(-2)
        tokens = x if k % 2 == 0 else torch.roll(x, shifts=1, dims=-1)
    return tokens


class TokenSide(nn.Module):
    """One side (prefix or suffix) of one token set; its tensors are stacked by `TokenSets`.

    Only tensors that shape the tokens are parameters: an empty side has none, and a side without
    rotation has no angles (`None`). Multi-device training (DDP) refuses parameters that never get a
    gradient.
    """

    def __init__(self, n_tokens: int, dim: int, config: TokenConfig, generator: torch.Generator) -> None:
        super().__init__()
        if config.rank > dim:
            raise ConfigError(f"rank {config.rank} exceeds the hidden size {dim}: E (D x m) needs m <= D")
        self.n_tokens = n_tokens
        b, s = config.bound, config.init_scale
        basis = torch.randn(dim, config.rank, generator=generator)  # drawn even for an empty side: the other
        # side's init stays what it was in earlier versions
        if config.init == "uniform":
            coeffs = (torch.rand(n_tokens, config.rank, generator=generator) * 2 - 1) * s * b
        elif config.init == "normal":
            coeffs = (torch.randn(n_tokens, config.rank, generator=generator) * s * b).clamp(-b, b)
        elif config.init == "zeros":
            coeffs = torch.zeros(n_tokens, config.rank)
        else:
            raise ConfigError(f"unknown init {config.init!r}; choose uniform, normal or zeros")
        used = n_tokens > 0
        self.basis = nn.Parameter(basis) if used else None
        self.coeffs = nn.Parameter(coeffs) if used else None
        self.angles = nn.Parameter(torch.zeros(n_tokens, config.rotation_angles)) if used and config.rotation_angles \
            else None
        self.bias = nn.Parameter(torch.zeros(dim)) if used and config.bias else None


def side_tokens(basis: Tensor, coeffs: Tensor, angles: Tensor | None, bias: Tensor | None) -> Tensor:
    """Tokens (G, n, D) from stacked basis (G, D, m), coeffs (G, n, m), angles (G, n, a) or None (no rotation),
    bias (G, D) or None."""
    tokens = coeffs @ orthonormal_basis(basis).transpose(-1, -2)  # (G, n, D)
    if angles is not None:
        tokens = rotate(tokens, angles)
    if bias is not None:
        tokens = tokens + bias.unsqueeze(-2)
    return tokens


class PromptTokens(nn.Module):
    """One token set: a prefix and a suffix side."""

    def __init__(self, config: TokenConfig, dim: int, seed: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
        self.prefix = TokenSide(config.n_prefix, dim, config, generator)
        self.suffix = TokenSide(config.n_suffix, dim, config, generator)


class TokenSets(nn.Module):
    """`num_sets` independent token sets (prompt-wise) or one shared set (prompt-batch).

    Each set owns separate parameter tensors, so an optimiser skips the sets that got no
    gradient in a step (their `.grad` stays None): sets never influence each other.
    """

    def __init__(self, config: TokenConfig, dim: int, num_sets: int = 1) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.sets = nn.ModuleList(PromptTokens(config, dim, seed=config.seed + k) for k in range(num_sets))

    @classmethod
    def initial(cls, config: TokenConfig, dim: int, set_ids: Sequence[int]) -> TokenSets:
        """The sets `set_ids` of a `TokenSets(config, dim, ...)` as initialised, before any step, numbered 0, 1, ..."""
        initial = cls(config, dim, 0)
        initial.sets = nn.ModuleList(PromptTokens(config, dim, seed=config.seed + k) for k in set_ids)
        return initial

    def __len__(self) -> int:
        return len(self.sets)

    def forward(self, set_ids: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Prefix (B, n_prefix, D) and suffix (B, n_suffix, D) for each batch item's set."""
        ids = torch.as_tensor(set_ids, dtype=torch.long).cpu()
        unique, inverse = torch.unique(ids, return_inverse=True)
        chosen = [self.sets[int(k)] for k in unique]
        return self._side(chosen, "prefix")[inverse], self._side(chosen, "suffix")[inverse]

    def _side(self, chosen: list[PromptTokens], which: str) -> Tensor:
        sides: list[TokenSide] = [getattr(s, which) for s in chosen]
        if sides[0].n_tokens == 0:
            other = getattr(chosen[0], "suffix" if which == "prefix" else "prefix")
            return other.coeffs.new_zeros(len(sides), 0, self.dim)

        def stacked(name: str) -> Tensor | None:
            return torch.stack([getattr(s, name) for s in sides]) if getattr(sides[0], name) is not None else None

        return side_tokens(stacked("basis"), stacked("coeffs"), stacked("angles"), stacked("bias"))

    @torch.no_grad()
    def project_(self) -> None:
        """Put every coefficient back into [-bound, bound] (call after each optimiser step)."""
        b = self.config.bound
        for p in self.coefficients():
            p.clamp_(-b, b)

    def coefficients(self) -> list[nn.Parameter]:
        """All coefficient tensors z (the range-constrained parameters)."""
        return [side.coeffs for s in self.sets for side in (s.prefix, s.suffix) if side.coeffs is not None]

    def clip_grad_norm_per_set_(self, max_norm: float) -> Tensor:
        """Clip each set's gradient to `max_norm` on its own; returns the norms before clipping."""
        norms = [
            nn.utils.clip_grad_norm_(params, max_norm)
            for params in ([p for p in s.parameters() if p.grad is not None] for s in self.sets)
            if params
        ]
        return torch.stack(norms) if norms else torch.zeros(0)

    def non_finite_gradients(self) -> list[int]:
        """The sets whose gradient holds a NaN or infinite value."""
        return [i for i, s in enumerate(self.sets)
                if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in s.parameters())]

    def num_trainable(self) -> int:
        """Number of trainable scalars over all sets."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

