"""The archive on disk: ``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, written durably.

A file appears under its final name only complete and on disk. :meth:`Archive.write` and
:meth:`PendingFile.commit`, in this order:

1. write it under a temporary name in its target directory (``.<name>.<random>.part``);
2. fsync it (on a background thread, while it is hashed and its index row prepared);
3. rename it over its final name (atomic on POSIX file systems);
4. fsync the directory, so that the new name itself survives a power loss.

Only then may the index row be committed and the sender be told success (``storage/ingest.py``).

Each write is also recorded, before step 1, in a journal of writes in flight: one small file in
``<root>/.journal/`` naming the target and the temporary file, locked (``flock``) by its writer and
removed once the index row is committed (:meth:`PendingFile.retire`). A start therefore reads only
the journal, never the whole archive: an entry nobody holds is a write a crash interrupted, and only
its target can be a complete file without a row (:meth:`Archive.interrupted_writes`). The entry is
created before the rename, so the directory fsync of step 4, which on a journalling file system
(ext4, XFS) commits every earlier change of names, makes it durable too. A walk over every file is
the explicit ``cradle archive check`` (``storage/check.py``).

Why not rename first and let the file's fsync carry the rename too (on ext4 and XFS it commits
the journal transaction holding an earlier rename), making the directory fsync cheap? Measured on
this machine (ext4, data=ordered, a virtio disk with a write-back cache, other processes writing):
the file's fsync (2 MB: about 2 ms of data) runs while the row is prepared and is mostly hidden
behind it; what the writer waits for is the directory fsync, 0.2 ms at best and 1–4 ms (median) under load,
because each fsync ends with a flush of the device's write-back cache. After a rename-first reorder
the directory fsync still flushes that cache and cost about the same (p10 0.14–0.58 against
0.41–0.60 ms, median 2.8–3.6 against 3.5–3.8 ms; 150 instances, three runs each way). So the
reorder would gain a few tenths of a millisecond at most, and it would open a window
in which a torn file stands under its final name, which every reader of the archive (a start's
recovery, a worker, ``cradle archive check`` rebuilding a lost index) would then have to tell from a complete one. In this
order a file under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.files import fsync_directory

TEMP_SUFFIX = ".part"
JOURNAL_DIR = ".journal"
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


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the file ``path`` from ``offset``: a part of a file's content that is copied
    from another file in chunks (a received data set), never read whole into memory."""

    path: Path
    offset: int
    length: int

    CHUNK = 1024 * 1024

    def __len__(self) -> int:
        return self.length

    def chunks(self):  # noqa: ANN201 - Iterator[bytes]
        with open(self.path, "rb") as source:
            source.seek(self.offset)
            remaining = self.length
            while remaining:
                chunk = source.read(min(self.CHUNK, remaining))
                if not chunk:
                    raise ArchiveError(5, f"{self.path.name} is shorter than expected")  # EIO
                remaining -= len(chunk)
                yield chunk


Data = bytes | Sequence[bytes | FileRange]
"""A file's content, whole or in parts (e.g. file meta + data set as received, not joined)."""


def content_hash(data: Data) -> str:
    digest = hashlib.sha256()
    for part in _parts(data):
        for chunk in _chunks(part):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(part: bytes | FileRange):  # noqa: ANN202 - Iterable[bytes]
    return part.chunks() if isinstance(part, FileRange) else (part,)


def _parts(data: Data) -> Sequence[bytes]:
    return (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data


class PendingFile:
    """A complete file under a temporary name beside its target, hashed and fsynced in the background.

    ``commit()`` waits for the fsync, renames the file into place and fsyncs the directory;
    ``discard()`` removes it. Meanwhile the caller can do other work, e.g. prepare the index row
    (which must be committed only after ``commit()``). Until then the file stays open and locked
    (``flock``), which tells a start (or an archive check) in another process that it is not abandoned.
    """

    def __init__(self, archive: "Archive", relative: str, target: Path, temp: Path, fd: int, size: int,
                 digest: Future[str], synced: Future[None] | None, entry: "JournalEntry") -> None:
        self.archive, self.relative, self.target, self.temp, self._fd = archive, relative, target, temp, fd
        self.size, self._digest, self._synced, self.entry = size, digest, synced, entry
        self.renamed = False

    @property
    def stored(self) -> StoredFile:
        """What the index records of the file (waits for its hash)."""
        return StoredFile(self.relative, self.size, self._digest.result())

    def commit(self) -> StoredFile:
        try:
            if self._synced is not None:
                self._synced.result()
            os.replace(self.temp, self.target)
            self.renamed = True
            self._close()
            if self.archive.fsync:
                fsync_directory(self.target.parent)
        except OSError as exc:
            self.discard()
            raise ArchiveError(exc.errno, f"cannot store {self.relative}: {exc.strerror or exc}") from exc
        return self.stored

    def retire(self) -> None:
        """The index row is committed (or none is wanted): the write is no longer in flight."""
        self.entry.retire()

    def discard(self) -> None:
        """Remove the temporary file. Before ``commit()`` nothing of the write remains; after it the
        journal entry stays (unlocked), so that the next start indexes the renamed file if its row
        never committed."""
        with contextlib.suppress(OSError):  # e.g. ENOTDIR: then there is no temporary file either
            self.temp.unlink(missing_ok=True)
        if self._synced is not None:
            with contextlib.suppress(OSError):
                self._synced.result()  # the fsync still running on the unlinked file, before its fd closes
        self._close()
        if self.renamed:
            self.entry.release()
        else:
            self.entry.retire()

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class Archive:
    """Files under ``root``, written durably (the module's docstring has the order and the why).

    Hashing and fsyncing run on a pool of threads owned by the archive (both release the GIL),
    beside the writer's own work (reading the index, preparing the row): for a 2 MB instance the
    disk needs about 2 ms for the data and SHA-256 1–2 ms of CPU. Handing work to a waiting thread
    costs less than starting one per write; the pool grows only with concurrent writes.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self._pool_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def _background(self) -> ThreadPoolExecutor:
        """This process's pool, made on first use; a forked child (e.g. a prefork Celery worker)
        makes its own, as threads do not survive a fork."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(32, thread_name_prefix="archive")
                self._pool_pid = os.getpid()
            return self._pool

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
        pending = self.write(relative, data)
        stored = pending.commit()
        pending.retire()
        return stored

    def write(self, relative: str, data: Data) -> PendingFile:
        """Write ``data`` under a temporary name next to ``relative``, hashing it meanwhile, and start
        its fsync; the file takes its name on ``PendingFile.commit()``."""
        target = self.absolute(relative)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")
        parts = _parts(data)
        entry = self._journal(relative, temp)
        try:
            self._make_dirs(target.parent)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            entry.retire()
            raise ArchiveError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}") from exc
        pool = self._background()
        streamed = any(isinstance(part, FileRange) for part in parts)
        if streamed:  # hashed as it is copied, chunk by chunk
            digest: Future[str] = Future()
            hasher = hashlib.sha256()
        else:
            digest = pool.submit(content_hash, parts)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file takes its name or is removed (or we die)
            for part in parts:
                for chunk in _chunks(part):
                    if streamed:
                        hasher.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            if streamed:
                digest.set_result(hasher.hexdigest())
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                temp.unlink()
            entry.retire()
            raise ArchiveError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}") from exc
        synced = pool.submit(os.fsync, fd) if self.fsync else None
        return PendingFile(self, relative, target, temp, fd, sum(len(p) for p in parts), digest, synced, entry)

    def _journal(self, relative: str, temp: Path) -> "JournalEntry":
        """Record a write in flight: a locked entry naming its target and temporary file."""
        directory = self.root / JOURNAL_DIR
        path = directory / uuid.uuid4().hex
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self._make_dirs(directory)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{relative}\n{temp.name}\n".encode())
        except OSError as exc:
            raise ArchiveError(exc.errno, f"cannot store {relative}: {exc.strerror or exc}") from exc
        return JournalEntry(path, relative, temp, fd)

    def interrupted_writes(self) -> list["JournalEntry"]:
        """The journal's entries no writer holds (its process died), each locked by this process
        until it is retired or released; a start reads these and nothing else."""
        directory = self.root / JOURNAL_DIR
        if not directory.is_dir():
            return []
        entries = []
        for path in sorted(directory.iterdir()):
            entry = _take_entry(self, path)
            if entry is not None:
                entries.append(entry)
        return entries

    def read(self, relative: str) -> bytes:
        return self.absolute(relative).read_bytes()

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def remove(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def files(self) -> list[str]:
        """Relative paths of every complete ``.dcm`` file under the root (a walk of the whole archive:
        for checks and tests, never on a start)."""
        if not self.root.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*.dcm")
                      if not p.name.startswith(".") and JOURNAL_DIR not in p.parts)

    def remove_temporaries(self) -> int:
        """Delete the temporary files an interrupted write left behind; return how many.

        A temporary file still locked belongs to a write in progress (a worker storing a result
        while the listener restarts) and is left to it."""
        if not self.root.exists():
            return 0
        removed = 0
        for temp in self.root.rglob(f"*{TEMP_SUFFIX}"):
            if abandoned(temp):
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
                fsync_directory(created.parent)


def _locked(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock, or None when a writer holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def abandoned(temp: Path) -> bool:
    """Whether no writer holds ``temp`` (its lock can be taken)."""
    fd = _locked(temp)
    if fd is None:
        return False
    os.close(fd)
    return True


class JournalEntry:
    """One write in flight (``<root>/.journal/<id>``), locked by whoever holds ``fd``."""

    def __init__(self, path: Path, relative: str, temp: Path | None, fd: int) -> None:
        self.path, self.relative, self.temp, self._fd = path, relative, temp, fd

    def retire(self) -> None:
        """Remove the entry: the write finished (its row is committed) or left nothing behind."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Let go of the entry, keeping it for the next start."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _take_entry(archive: Archive, path: Path) -> JournalEntry | None:
    """``path``'s entry locked by this process, or None when its writer still holds it (or it is gone)."""
    fd = _locked(path)
    if fd is None:
        return None
    relative, temp_name = (os.read(fd, 4096).decode("utf-8", "replace").split("\n") + ["", ""])[:2]
    try:  # an entry cut short (its writer died while writing it) names nothing: nothing else exists
        target = archive.absolute(relative) if relative else None
    except ArchiveError:
        target = None
    ours = temp_name.startswith(".") and temp_name.endswith(TEMP_SUFFIX) and "/" not in temp_name
    temp = target.with_name(temp_name) if target is not None and ours else None
    return JournalEntry(path, relative if target is not None else "", temp, fd)
