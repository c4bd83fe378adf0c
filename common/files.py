"""Files that appear whole or not at all: written beside their name, then renamed over it.

``durable=True`` adds what survives a power cut: the file is fsynced before the rename and its
directory after it (what the model registry needs). Caches and training checkpoints, which a rerun
rebuilds, skip the fsyncs. The archive has its own protocol (storage.archive: flock-held temporary
files, fsync on a pool) and uses :func:`fsync_directory` only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, *, durable: bool = False) -> Iterator[IO[bytes]]:
    """A binary handle on a temporary file next to ``path``, renamed to ``path`` when the block
    ends without an exception and removed otherwise."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    if durable:
        fsync_directory(path.parent)


def atomic_write(path: Path, data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_file(path, durable=durable) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
