"""Prompt files and the PromptDataModule.

Prompt files: `.txt` (one prompt per line, blank lines skipped), `.csv` and `.jsonl` (one
prompt per row, read from `column`; "prompt" when not given; an empty cell is skipped with a
warning), UTF-8 with or without a byte-order mark. A prompt may appear once: a repeat would be
optimised twice, or count twice, or fall on both sides of a validation split.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ipgo.errors import ConfigError, UserError


class PromptFileError(UserError, ValueError):
    """A prompt file that cannot be used."""


COLUMN_FLAGS = "--data.column NAME for ipgo.fit, --column NAME for ipgo.generate and ipgo.evaluate"


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a .txt, .csv or .jsonl file, in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else (f" (relative paths are read from the current folder, {Path.cwd()}; "
                                               "the shipped configs name theirs from the repository root)")
        raise PromptFileError(f"prompt file {str(path)!r} does not exist{where}: check the path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if column is not None:
            raise PromptFileError(f"{path.name} is a .txt file (one prompt per line), which has no columns: leave the "
                                  "column unset")
        found = [(f"line {number}", line.strip()) for number, line in enumerate(_lines(path), 1)]
    elif suffix in (".csv", ".jsonl"):
        rows = _rows(path, suffix)
        key = column or "prompt"
        if rows and key not in rows[0][1]:
            raise PromptFileError(  # (a row with more fields than the header has them under None)
                f"{path.name} has no column {key!r}; its columns are {sorted(k for k in rows[0][1] if k is not None)}. "
                f"Choose one ({COLUMN_FLAGS})"
            )
        missing = next((where for where, row in rows if row.get(key) is None), None)
        if suffix == ".jsonl" and missing is not None:
            raise PromptFileError(f"{path.name} {missing} has no {key!r}: give every row one")
        found = [(where, str(row.get(key) or "").strip()) for where, row in rows]
        empty = [where for where, prompt in found if not prompt]
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            warnings.warn(f"{path.name}: {len(empty)} {'rows have' if len(empty) > 1 else 'row has'} an empty {key!r} "
                          f"({shown}), skipped", UserWarning, stacklevel=2)
    else:
        raise PromptFileError(f"unsupported prompt file type {path.suffix!r}: use .txt, .csv or .jsonl")
    found = [(where, prompt) for where, prompt in found if prompt]
    if not found:
        raise PromptFileError(f"prompt file {str(path)!r} has no prompts: add one prompt per line (or row)")
    seen: dict[str, tuple[str, str]] = {}
    for where, prompt in found:
        earlier = seen.get(prompt_key(prompt))
        if earlier is not None:
            differs = "" if earlier[1] == prompt else f" but for case or spacing ({earlier[1]!r})"
            raise PromptFileError(
                f"{path.name}: {where} ({prompt!r}) repeats {earlier[0]}{differs}; a prompt may appear "
                "once (a repeat would be optimised twice, or fall on both sides of a validation split): remove it"
            )
        seen[prompt_key(prompt)] = (where, prompt)
    return [prompt for _, prompt in found]


def prompt_key(prompt: str) -> str:
    """What makes two prompts the same one: CLIP's tokenizers ignore case and spacing."""
    return " ".join(prompt.split()).casefold()


def _lines(path: Path) -> list[str]:
    """Lines split at newlines only (not at the other characters `str.splitlines` breaks on), without a BOM."""
    try:
        return path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").split("\n")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _not_utf8(path: Path, error: UnicodeDecodeError) -> PromptFileError:
    return PromptFileError(f"{path.name} is not UTF-8 text (it holds the byte {error.object[error.start]:#04x}, "
                           f"which is not UTF-8 there): save it as UTF-8")


def _rows(path: Path, suffix: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a .csv or .jsonl file, each with where it is in the file ("line N"; a .csv row whose quoted field
    spans lines: its last line)."""
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as handle:  # newline="": quoted fields may span lines
            reader = csv.DictReader(handle)
            try:
                return [(f"line {reader.line_num}", row) for row in reader]
            except UnicodeDecodeError as error:
                raise _not_utf8(path, error) from None
    rows = []
    for number, line in enumerate(_lines(path), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path.name} line {number} is not valid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise PromptFileError(f'{path.name} line {number} is not a JSON object: write {{"prompt": "..."}}')
            rows.append((f"line {number}", row))
    return rows


class EpochShuffle(Sampler[int]):
    """A new order of the training prompts each epoch, fixed by (seed, epoch): a resumed run sees the orders
    that an uninterrupted one would (Lightning calls `set_epoch` at the start of every epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class PromptDataset(Dataset):
    """Items {"index": position in the prompt list, "prompt": text}."""

    def __init__(self, prompts: list[str], indices: list[int]) -> None:
        self.prompts = prompts
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": self.indices[i], "prompt": self.prompts[i]}


class PromptDataModule(L.LightningDataModule):
    """Prompts to optimise for, with an optional held-out validation split.

    Args:
        prompts: path of a .txt, .csv or .jsonl prompt file.
        column: column holding the prompt in .csv/.jsonl files (default "prompt").
        batch_size: prompts per optimisation step (prompt-wise: optimised together, each with
            its own tokens; prompt-batch: one step of the shared tokens).
        val_fraction: share of prompts held out for validation (prompt-batch only).
        shuffle: shuffle training prompts every epoch (prompt-batch), in an order fixed by split_seed and the
            epoch (a resumed run sees the orders an uninterrupted one would).
        split_seed: seed of the train/validation split.
        limit: use only the first `limit` prompts of the file.
    """

    def __init__(
        self,
        prompts: str,
        column: str | None = None,
        batch_size: int = 4,
        val_fraction: float = 0.0,
        shuffle: bool = False,
        split_seed: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be >= 1 (or left out for every prompt), got {limit}")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.file_prompts = read_prompts(prompts, column)  # read now: a bad file is reported before the trainer starts
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.shuffle = shuffle
        self.split_seed = split_seed
        self.limit = limit
        self.train_prompts: list[str] = []
        self.val_prompts: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_prompts:
            return
        prompts = self.file_prompts[: self.limit]
        order = list(range(len(prompts)))
        n_val = round(len(prompts) * self.val_fraction)
        if self.val_fraction and (n_val == 0 or n_val == len(prompts)):
            raise ConfigError(
                f"val_fraction={self.val_fraction} of {len(prompts)} prompts leaves an empty split; "
                "use more prompts or another fraction"
            )
        random.Random(self.split_seed).shuffle(order)
        val = set(order[:n_val])
        self.train_prompts = [p for i, p in enumerate(prompts) if i not in val]
        self.val_prompts = [p for i, p in enumerate(prompts) if i in val]

    def train_dataloader(self) -> DataLoader:
        dataset = PromptDataset(self.train_prompts, list(range(len(self.train_prompts))))
        sampler: Sampler[int] | None = EpochShuffle(len(dataset), self.split_seed) if self.shuffle else None
        shares = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if shares and shares["num_replicas"] > 1:
            # Lightning's own sampler here would shuffle whatever `shuffle` says; this one follows it (fixed by
            # split_seed and the epoch, which Lightning sets), and pads the shares to equal size as Lightning does
            sampler = DistributedSampler(dataset, shuffle=self.shuffle, seed=self.split_seed, **shares)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        """The training prompts in file order: the multi-process prompt-wise path optimises them here."""
        dataset = PromptDataset(self.train_prompts, list(range(len(self.train_prompts))))
        return DataLoader(dataset, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_prompts:
            return []
        dataset = PromptDataset(self.val_prompts, list(range(len(self.val_prompts))))
        return DataLoader(dataset, batch_size=self.batch_size)
