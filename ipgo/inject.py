"""How learned tokens join a prompt's encoder output, and the conformity penalty.

The text encoder runs on the prompt padded to the model's length S (77 for CLIP), giving
states h (S x D); the first L of them are the prompt's real tokens (BOS, words, EOS), the
rest the states of padding. With a prefix P (n_p x D) and a suffix Q (n_s x D) the
conditioning sequence is

    cond = [ P ; h[:L] ; Q ; h[L : L + total - n_p - L - n_s] ]      (length `total`)

`layout="padded"` keeps total = S, the length the denoiser was trained with. A family whose sequence goes on
after the CLIP states (SD 3: its T5 states) keeps that part as it is; only CLIP's padding states give way.
`layout="unpadded"` (the published notebook) uses total = n_p + L + n_s, so the prompts of one
`conditioning` call must share L: a shorter row stretched to a longer one's length would see
filler states after its suffix and give other images than alone, unless a cross-attention mask
hides them (`masked`, on UNets; diffusers pipelines pass none, so the token files' path groups).
Either way n_p + L + n_s <= S must hold (the backbone truncates or rejects longer prompts).

Classifier-free guidance uses the model family's unconditional branch with no learned
tokens, cut to the same length: uncond = h_empty[:total] (SDXL: zeros, as its pipeline does).

IPGO+ (prompt-batch): the shared tokens are made prompt-dependent by a parameter-free
cross-attention over the prompt's real states h[:L] (no weights, so no parameters added):

    P' = P + softmax(P h[:L]^T / sqrt(D)) h[:L]        and the same for Q

Conformity (a soft penalty) keeps the token-mean of [P ; h[:L] ; Q] near that of h[:L]:

    conformity = mean_d | mean_tokens([P ; h[:L] ; Q]) - mean_tokens(h[:L]) |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from ipgo.backbones.base import Backbone, Conditioning, PromptEmbeds, TooLong
from ipgo.errors import UserError

Layout = Literal["padded", "unpadded"]


def sequence_length(lengths: Tensor, n_prefix: int, n_suffix: int, max_length: int, layout: Layout) -> int:
    """Length of the conditioning sequence for prompts with `lengths` real tokens."""
    if layout == "padded":
        return max_length
    if layout == "unpadded":
        return n_prefix + int(lengths.max()) + n_suffix
    raise ValueError(f"unknown layout {layout!r}; choose 'padded' or 'unpadded'")


def inject(hidden: Tensor, lengths: Tensor, prefix: Tensor, suffix: Tensor, total: int) -> Tensor:
    """Build the conditioning sequence (B, total, D); see the module docstring.

    Args:
        hidden: prompt states (B, S, D) over the padded sequence.
        lengths: real tokens per prompt (B,), BOS and EOS included.
        prefix: (B, n_p, D) learned prefix tokens.
        suffix: (B, n_s, D) learned suffix tokens.
        total: output length, at least n_p + max(lengths) + n_s and at most n_p + S + n_s.
    """
    n_p, n_s = prefix.shape[1], suffix.shape[1]
    if n_p + int(lengths.max()) + n_s > total:
        raise ValueError(f"{n_p} + {int(lengths.max())} + {n_s} tokens do not fit in a sequence of {total}")
    source = torch.cat([prefix.to(hidden.dtype), suffix.to(hidden.dtype), hidden], dim=1)  # (B, n_p+n_s+S, D)
    pos = torch.arange(total, device=hidden.device).unsqueeze(0)  # (1, total)
    length = lengths.to(hidden.device).unsqueeze(1)  # (B, 1)
    offset = n_p + n_s  # where `hidden` starts inside `source`
    index = torch.where(
        pos < n_p,
        pos,  # prefix
        torch.where(
            pos < n_p + length,
            offset + pos - n_p,  # prompt's real tokens
            torch.where(pos < n_p + length + n_s, n_p + pos - n_p - length, offset + pos - n_p - n_s),
        ),  # suffix, then the padding states that follow the real tokens
    )
    return torch.gather(source, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def conformity(hidden: Tensor, lengths: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
    """Per-prompt conformity penalty (B,); see the module docstring."""
    length = lengths.to(hidden.device)
    real = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) < length.unsqueeze(1)
    prompt_sum = (hidden.float() * real.unsqueeze(-1)).sum(dim=1)  # (B, D)
    prompt_mean = prompt_sum / length.unsqueeze(1)
    n_total = length + prefix.shape[1] + suffix.shape[1]
    full_mean = (prompt_sum + prefix.float().sum(1) + suffix.float().sum(1)) / n_total.unsqueeze(1)
    return (full_mean - prompt_mean).abs().mean(dim=-1)


def attend_to_prompt(tokens: Tensor, hidden: Tensor, lengths: Tensor) -> Tensor:
    """IPGO+: make shared tokens prompt-dependent with a parameter-free cross-attention (see module docstring)."""
    if tokens.shape[1] == 0:
        return tokens
    scores = tokens.to(hidden.dtype) @ hidden.transpose(1, 2) / hidden.shape[-1] ** 0.5  # (B, n, S)
    real = torch.arange(hidden.shape[1], device=hidden.device)[None, None, :] < lengths.to(hidden.device)[:, None, None]
    weights = scores.masked_fill(~real, float("-inf")).softmax(dim=-1)
    return tokens + (weights @ hidden).to(tokens.dtype)


def conditioning(
    backbone: Backbone,
    prompts: Sequence[str],
    prefix: Tensor,
    suffix: Tensor,
    layout: Layout = "padded",
    too_long: TooLong = "error",
    negative_prompts: Sequence[str] | None = None,
    prompt_attention: bool = False,
    masked: bool = False,
) -> tuple[Conditioning, Conditioning, PromptEmbeds, Tensor, Tensor]:
    """Conditioning, unconditional branch, the prompts' embeddings and the tokens as placed.

    The one place that turns prompts plus tokens into denoiser inputs: training, rendering
    and the diffusers integration all call it. Zero-length prefix and suffix with the padded
    layout give exactly the plain pipeline's embeddings. With `prompt_attention` (IPGO+) the
    returned prefix and suffix are the prompt-conditioned ones. With `masked` and a denoiser that takes a
    cross-attention mask, unpadded prompts of different lengths share the call: each row is masked to its own
    n_p + L + n_s states (and its unconditional branch to as many), so it gives the images it gives alone.
    """
    n_p, n_s = prefix.shape[1], suffix.shape[1]
    embeds = backbone.encode(prompts, reserved=n_p + n_s, too_long=too_long)
    lengths_differ = layout == "unpadded" and len(set(embeds.lengths.tolist())) > 1
    if lengths_differ and not (masked and backbone.masks_cross_attention):
        raise UserError(
            "with the unpadded layout, prompts of different token lengths cannot share one call (the shorter ones "
            "would be stretched with filler states and give other images): call once per prompt, or per length"
        )
    total = sequence_length(embeds.lengths, n_p, n_s, backbone.sequence_length, layout)
    device = embeds.hidden.device
    prefix, suffix = prefix.to(device), suffix.to(device)
    if prompt_attention:
        prefix = attend_to_prompt(prefix, embeds.hidden, embeds.lengths)
        suffix = attend_to_prompt(suffix, embeds.hidden, embeds.lengths)
    # the tokens join the CLIP states (they give way to them: there are at least n_p + n_s padding states); what
    # follows them, SD 3's T5 states, keeps its place and all its states
    clip, tail = embeds.hidden[:, : backbone.max_length], embeds.hidden[:, backbone.max_length :]
    placed = inject(clip, embeds.lengths, prefix, suffix, total - tail.shape[1])
    cond = Conditioning(torch.cat([placed, tail], dim=1), embeds.pooled)
    uncond = backbone.negative(len(prompts), total, negative_prompts)
    if lengths_differ:
        mask = torch.arange(total, device=device)[None] < (n_p + n_s + embeds.lengths.to(device))[:, None]  # (B, total)
        cond, uncond = replace(cond, mask=mask), replace(uncond, mask=mask)
    return cond, uncond, embeds, prefix, suffix
