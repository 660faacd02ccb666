"""The shapes world's tokenizer: CLIP's BPE cut down to the world's words.

It keeps CLIP's 512 byte-level symbols, the merges that build the caption words, and the two
special tokens: about 560 tokens instead of 49,408, so the text encoders' embedding tables are
small. Any text still tokenises (into smaller pieces), and captions get the same word tokens as
with the full vocabulary.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ipgo.shapes.world import COLOURS, SHAPES, SIDES

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

WORDS = ("a", "and", "on", "the", *SIDES, *COLOURS, *SHAPES)
BYTE_SYMBOLS = 512  # CLIP's first 512 tokens: 256 byte symbols, then the same with "</w>"
MAX_TOKENS = 77


@functools.cache
def _vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    from ipgo.testing import _clip_vocab

    full, merges = _clip_vocab()
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    used: set[tuple[str, str]] = set()
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            used.add(pair)
            merged, k = [], 0
            while k < len(parts):  # merge every occurrence, as BPE does
                if k + 1 < len(parts) and (parts[k], parts[k + 1]) == pair:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
    kept = tuple(sorted(used, key=ranks.get))
    byte_symbols = sorted(full, key=full.get)[:BYTE_SYMBOLS]
    tokens = byte_symbols + ["".join(pair) for pair in kept] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, kept


def shapes_tokenizer() -> CLIPTokenizer:
    """A new CLIP tokenizer over the shapes vocabulary (77 tokens, pad = end of text, as SD 1.x)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)


def text_config() -> dict[str, Any]:
    """The shapes text encoders' config (`CLIPTextConfig` arguments): 32 wide, 2 layers, this vocabulary."""
    vocab, _ = _vocabulary()
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=len(vocab), max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
