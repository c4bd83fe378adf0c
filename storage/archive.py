"""The archive on disk: ``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, written durably.

A file appears under its final name only complete: it is written to a temporary name in the
same directory, fsynced, renamed over, and the directory fsynced, before the index row is
committed and before the sender is told success.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

TEMP_SUFFIX = ".part"
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")


class ArchiveError(OSError):
    """The archive could not store or find a file (disk full, permissions, bad path)."""


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str


def safe_component(value: str) -> str:
    """A UID (or any string) made safe as one path component: no separators, no dot-dot."""
    cleaned = _UNSAFE.sub("_", value.strip())[:128]
    if cleaned in ("", ".", "..") or cleaned.startswith("."):
        cleaned = "_" + cleaned
    return cleaned


def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return "/".join((safe_component(study_uid), safe_component(series_uid), safe_component(sop_uid) + ".dcm"))


Data = bytes | Sequence[bytes]
"""A file's content, whole or in parts (e.g. file meta + data set as received, not joined)."""


def content_hash(data: Data) -> str:
    digest = hashlib.sha256()
    for part in _parts(data):
        digest.update(part)
    return digest.hexdigest()


def _fsync_and_close(fd: int, fsync: bool) -> None:
    try:
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _parts(data: Data) -> Sequence[bytes]:
    return (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data


T = TypeVar("T")


class _InBackground(threading.Thread, Generic[T]):
    """One call run beside the caller (hashing and fsync release the GIL); ``result()`` joins it."""

    def __init__(self, name: str, call: Callable[[], T]) -> None:
        super().__init__(name=name, daemon=True)
        self.call = call
        self.value: T | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc

    def result(self) -> T:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class PendingFile:
    """A file written under a temporary name beside its target and being fsynced in the background.

    ``commit()`` waits for the fsync, renames it into place and fsyncs the directory; ``discard()``
    removes it. Meanwhile the caller can do other work, e.g. prepare the index row (which must be
    committed only after ``commit()``).
    """

    def __init__(self, archive: "Archive", relative: str, target: Path, temp: Path, size: int,
                 digest: _InBackground, synced: _InBackground | None) -> None:
        self.archive, self.relative, self.target, self.temp = archive, relative, target, temp
        self.size, self._digest, self._synced = size, digest, synced

    @property
    def stored(self) -> StoredFile:
        return StoredFile(self.relative, self.size, self._digest.result())

    def commit(self) -> StoredFile:
        try:
            if self._synced is not None:
                self._synced.result()
            os.replace(self.temp, self.target)
            if self.archive.fsync:
                self.archive._fsync_dir(self.target.parent)
        except OSError as exc:
            self.discard()
            raise ArchiveError(exc.errno, f"cannot store {self.relative}: {exc.strerror or exc}") from exc
        return self.stored

    def discard(self) -> None:
        """Remove the temporary file (a no-op after ``commit()``); an fsync still running finishes on
        the unlinked file and closes it."""
        with contextlib.suppress(OSError):  # e.g. ENOTDIR: then there is no temporary file either
            self.temp.unlink(missing_ok=True)


class Archive:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def absolute(self, relative: str) -> Path:
        """The absolute path of ``relative``; refuses anything that would leave the root."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ArchiveError(f"path outside the archive: {relative!r}")
        return path

    def put(self, relative: str, data: Data) -> StoredFile:
        """Write ``data`` (bytes, or parts written one after the other) durably under ``relative``,
        replacing any file there."""
        return self.write(relative, data).commit()

    def write(self, relative: str, data: Data) -> PendingFile:
        """Write ``data`` under a temporary name next to ``relative`` and start its fsync (and its
        sha256) in the background; the file takes its name on ``PendingFile.commit()``."""
        target = self.absolute(relative)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        parts = _parts(data)
        digest = _InBackground("archive-hash", lambda: content_hash(parts))
        try:
            self._make_dirs(target.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            digest.join()
            raise ArchiveError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}") from exc
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
        except OSError as exc:
            os.close(fd)
            PendingFile(self, relative, target, temp, 0, digest, None).discard()
            digest.join()
            raise ArchiveError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}") from exc
        synced = _InBackground("archive-fsync", lambda: _fsync_and_close(fd, self.fsync))
        return PendingFile(self, relative, target, temp, sum(len(p) for p in parts), digest, synced)

    def read(self, relative: str) -> bytes:
        return self.absolute(relative).read_bytes()

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def remove(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def files(self) -> list[str]:
        """Relative paths of every complete ``.dcm`` file under the root."""
        if not self.root.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*.dcm")
                      if not p.name.startswith("."))

    def remove_temporaries(self) -> int:
        """Delete the temporary files an interrupted write left behind; return how many."""
        if not self.root.exists():
            return 0
        removed = 0
        for temp in self.root.rglob(f"*{TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)
            removed += 1
        return removed

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for created in reversed(missing):
            try:
                created.mkdir(mode=0o700)
            except FileExistsError:
                continue
            if self.fsync:
                self._fsync_dir(created.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
