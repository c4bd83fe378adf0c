"""``cradle archive check``: the archive's files against the index's rows, every one of them.

What a start no longer does (it reads only the journal of writes in flight, ``storage/archive.py``)
is done here, explicitly, with a progress bar:

1. ``rows``: every instance row, in id order: is its file there, of its size, with its SHA-256?
2. ``files``: every study directory, in name order: files without a row (a power loss that rolled
   back the newest SQLite commits, an index restored from an older backup), temporary files nobody
   holds (writes a crash interrupted before the journal existed).

Read-only unless ``repair``: then a row whose file is gone is deleted, a complete file without a row
is indexed from its header (a torn one is counted and left, as at a start), and an abandoned
temporary file is removed. A file whose content differs from its row's hash is reported, never
"repaired": which of the two is right is for an administrator to decide.

Resumable: after each batch the position (phase, last row id, last study directory) and the counts so
far are written to ``state_file``; a check started again continues from there, and the file is
removed when the check completes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from common.files import atomic_file
from storage.archive import TEMP_SUFFIX, FileRange, abandoned, content_hash
from storage.db import transaction
from storage.ingest import Ingest, sop_uid_of
from storage.models import Instance

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class CheckReport:
    rows_checked: int = 0
    files_checked: int = 0
    rows_without_file: int = 0
    size_or_hash_mismatch: int = 0
    files_without_row: int = 0
    unreadable_files: int = 0
    temporaries: int = 0
    repaired: int = 0
    complete: bool = False


@dataclass
class _Position:
    phase: str = "rows"
    after_id: int = 0
    after_directory: str = ""
    report: CheckReport = field(default_factory=CheckReport)


class ArchiveCheck:
    """One check of ``ingest``'s archive and index (see the module's docstring)."""

    def __init__(self, ingest: Ingest, state_file: Path, *, repair: bool = False, progress: bool = True) -> None:
        self.ingest, self.archive, self.sessions = ingest, ingest.archive, ingest.sessions
        self.state_file, self.repair, self.progress = Path(state_file), repair, progress

    def run(self) -> CheckReport:
        position = self._load()
        if position.phase == "rows":
            self._rows(position)
            position.phase = "files"
            self._save(position)
        self._files(position)
        position.report.complete = True
        self.state_file.unlink(missing_ok=True)
        return position.report

    # --- rows against files --------------------------------------------------------------------

    def _rows(self, position: _Position) -> None:
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(Instance).where(Instance.id > position.after_id))
        with tqdm(total=total, desc="rows", unit="row", disable=not self.progress) as bar:
            for batch in self._row_batches(position.after_id):
                missing = [pk for pk, path, size, sha in batch if not self._file_matches(path, size, sha, position)]
                position.report.rows_checked += len(batch)
                if missing and self.repair:
                    with transaction(self.sessions) as session:
                        session.execute(delete(Instance).where(Instance.id.in_(missing)))
                    position.report.repaired += len(missing)
                position.after_id = batch[-1][0]
                self._save(position)
                bar.update(len(batch))

    def _row_batches(self, after_id: int) -> Iterator[list[tuple[int, str, int, str]]]:
        while True:
            with self.sessions() as session:
                batch = [tuple(row) for row in session.execute(
                    select(Instance.id, Instance.file_path, Instance.file_size, Instance.sha256)
                    .where(Instance.id > after_id).order_by(Instance.id).limit(BATCH))]
            if not batch:
                return
            yield batch
            after_id = batch[-1][0]

    def _file_matches(self, path: str, size: int, sha256: str, position: _Position) -> bool:
        """False when the file is gone (its row may go); a differing file is counted and kept."""
        absolute = self.archive.absolute(path)
        try:
            actual = absolute.stat().st_size
        except FileNotFoundError:
            log.warning("archive check: row without its file %s", path)
            position.report.rows_without_file += 1
            return False
        if actual != size or content_hash([FileRange(absolute, 0, actual)]) != sha256:
            log.warning("archive check: %s differs from its row (size or SHA-256)", path)
            position.report.size_or_hash_mismatch += 1
        return True

    # --- files against rows --------------------------------------------------------------------

    def _files(self, position: _Position) -> None:
        root = self.archive.root
        directories = sorted(entry.name for entry in os.scandir(root) if entry.is_dir()
                             and not entry.name.startswith(".")) if root.is_dir() else []
        remaining = [name for name in directories if name > position.after_directory]
        with tqdm(total=len(remaining), desc="studies", unit="study", disable=not self.progress) as bar:
            for name in remaining:
                self._study_directory(root / name, position.report)
                position.after_directory = name
                self._save(position)
                bar.update(1)

    def _study_directory(self, directory: Path, report: CheckReport) -> None:
        files, temporaries = [], []
        for path in sorted(directory.rglob("*")):
            if path.name.endswith(TEMP_SUFFIX):
                temporaries.append(path)
            elif path.suffix == ".dcm" and not path.name.startswith(".") and path.is_file():
                files.append(path.relative_to(self.archive.root).as_posix())
        report.files_checked += len(files)
        for temp in temporaries:
            if abandoned(temp):
                report.temporaries += 1
                if self.repair:
                    temp.unlink(missing_ok=True)
                    report.repaired += 1
        for path in self._without_rows(files):
            report.files_without_row += 1
            log.warning("archive check: file without a row %s", path)
            if self.repair:
                self._reindex(path, report)

    def _without_rows(self, files: list[str]) -> list[str]:
        """Of ``files``, those no row names (rows found by the SOP Instance UIDs the names carry)."""
        indexed: set[str] = set()
        with self.sessions() as session:
            for start in range(0, len(files), BATCH):
                uids = [sop_uid_of(path) for path in files[start:start + BATCH]]
                indexed.update(session.scalars(select(Instance.file_path).where(Instance.sop_uid.in_(uids))))
        return [path for path in files if path not in indexed]

    def _reindex(self, path: str, report: CheckReport) -> None:
        try:
            self.ingest.reindex(path)
            report.repaired += 1
        except (InvalidDicomError, ValueError, OSError, AttributeError, SQLAlchemyError) as exc:
            log.warning("archive file %s could not be indexed: %s", path, type(exc).__name__)
            report.unreadable_files += 1

    # --- where a check stopped -----------------------------------------------------------------

    def _load(self) -> _Position:
        if not self.state_file.is_file():
            return _Position()
        saved = json.loads(self.state_file.read_text())
        return _Position(saved["phase"], saved["after_id"], saved["after_directory"],
                         CheckReport(**saved["report"]))

    def _save(self, position: _Position) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.state_file) as handle:
            handle.write(json.dumps(asdict(position)).encode())
