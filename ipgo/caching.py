"""A bounded memo of per-prompt values (encodings, text features) computed in batches."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


def cached(cache: dict[Key, Value], keys: Sequence[Key], compute: Callable[[list[Key]], Iterable[Value]],
           limit: int) -> list[Value]:
    """The values of `keys`, computing the missing ones in one call of `compute`.

    New values are kept while the cache holds fewer than `limit`; beyond that they are computed and
    returned, not kept. Training visits every prompt once an epoch, so with more prompts than fit,
    keeping the first ones still saves their encoding each epoch, where dropping the oldest to make
    room would miss every prompt.
    """
    wanted = list(dict.fromkeys(keys))
    missing = [key for key in wanted if key not in cache]
    computed = dict(zip(missing, compute(missing), strict=True)) if missing else {}
    for key in missing[: max(0, limit - len(cache))]:
        cache[key] = computed[key]
    return [cache[key] if key in cache else computed[key] for key in keys]
