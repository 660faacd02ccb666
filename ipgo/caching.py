"""A bounded memo of per-prompt values (encodings, text features) computed in batches."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


def cached(cache: dict[Key, Value], keys: Sequence[Key], compute: Callable[[list[Key]], Iterable[Value]],
           limit: int) -> list[Value]:
    """The values of `keys`, computing the missing ones in one call of `compute`.

    Beyond `limit` entries the oldest are dropped, never one of this call's keys, so a batch
    always gets all its values however full the cache is.
    """
    wanted = list(dict.fromkeys(keys))
    missing = [key for key in wanted if key not in cache]
    if missing:
        cache.update(zip(missing, compute(missing), strict=True))
    values = [cache[key] for key in keys]
    excess = len(cache) - limit
    if excess > 0:
        keep = set(wanted)
        for key in [key for key in cache if key not in keep][:excess]:
            del cache[key]
    return values
