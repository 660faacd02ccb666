"""File output: atomic (a reader never sees a half-written file, a crash never eats an old one), and
never over what a user has in a folder unless asked."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipgo.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)  # on disk before the rename: after a power cut, old file or new
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.chmod(tmp, _NEW_FILE_MODE)  # some writers (safetensors) create files only their owner can read
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    mask = os.umask(0)  # reading it means setting it: done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_read_umask()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_writable_folder(folder: str | os.PathLike, option: str, command: str) -> None:
    """Refuse an output folder that is a file, lies under a file or cannot be written: found before the work, not
    after it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder: choose a folder for {command}'s output")
    ancestor = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is a file" if not ancestor.is_dir() else "is not writable"
        raise UserError(f"{option} {folder}: {command} cannot write there ({ancestor} {why}); choose another {option}")


def check_output_folder(out: str | os.PathLike, overwrite: bool, command: str) -> None:
    """Refuse a non-empty output folder unless `overwrite`: writing there would replace files in it."""
    folder = Path(out)
    check_writable_folder(folder, "--out", command)
    present = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    if present and not overwrite:
        raise UserError(
            f"{folder} is not empty ({listing(present)}): {command} would overwrite files there. Choose another "
            "--out, or pass --overwrite true."
        )


def listing(names: list[str], most: int = 4) -> str:
    """The first few names, for a message: "a, b, c, d, ..."."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
