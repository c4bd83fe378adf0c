"""Free space on the archive's file system, and the watermark below which nothing new is written.

:class:`DiskSpace` is the probe (``statvfs`` of one directory), an explicit collaborator of the ingest
and of retention, so that a test points it at a real small file system. :class:`Watermark` is the
policy of ``storage.min_free_bytes`` / ``storage.min_free_percent``: below it the listener answers
0xA700 (out of resources, retry later) before writing, so the disk never fills up under a sender.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskSpace:
    """The file system holding ``path``."""

    path: Path

    def usage(self) -> tuple[int, int]:
        """(free bytes an unprivileged writer may use, total bytes)."""
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize

    def free_bytes(self) -> int:
        return self.usage()[0]


@dataclass(frozen=True)
class Watermark:
    """``min_free_bytes`` or ``min_free_percent`` of the file system, whichever is more."""

    disk: DiskSpace
    min_free_bytes: int = 0
    min_free_percent: float = 0.0

    def required_bytes(self, total: int) -> int:
        return max(self.min_free_bytes, int(total * self.min_free_percent / 100))

    def shortfall(self, incoming: int = 0) -> int:
        """How many bytes are missing to store ``incoming`` more and stay above the watermark (0: none)."""
        if not (self.min_free_bytes or self.min_free_percent):
            return 0
        free, total = self.disk.usage()
        return max(0, self.required_bytes(total) + incoming - free)


def watermark_of(archive_dir: Path, min_free_bytes: int, min_free_percent: float) -> Watermark:
    """The watermark of the file system that holds (or will hold) ``archive_dir``."""
    probe = Path(archive_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return Watermark(DiskSpace(probe), min_free_bytes, min_free_percent)
