"""Crash-safe file writes shared by the shard writer and the checkpointer: data reaches the disk
(fsync) before a rename makes it visible, so a reader sees the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write-temp, fsync, rename over `path`, fsync the directory. ``durable=False`` skips both fsyncs:
    still all-or-nothing for readers, but it may be lost in a power cut (for advisory files)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
