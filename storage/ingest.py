"""Putting one instance into the archive and the index, in the order that loses nothing.

Used by the C-STORE handler (what modalities send) and by the workers (the node's own results).

The order (:meth:`Ingest.store`): the file is written, fsynced, renamed into place and its
directory fsynced (``storage/archive.py``); then the index row is committed; then the sender is
answered 0x0000. Hence, whenever the process or the machine stops:

* a file under its final name is complete and on disk; a row never exists without its file;
* an unfinished write leaves a temporary file and an entry in the journal of writes in flight
  (``storage/archive.py``); the next start (:meth:`Ingest.recover`) reads only that journal and
  removes the temporary file; the sender got no success and sends again;
* a complete file may lack its row after a crash between rename and commit, or an index that failed
  to commit (the sender got no success; its re-send is an identical duplicate and succeeds). Its
  journal entry is still there, and the next start indexes the file from its header. Only the
  calling AE title and the receive time of such an instance are not in the file: they are recorded
  as unknown ("") and the start's time.
* a power loss (not a process crash) may also roll back the newest SQLite commits (``storage/db.py``:
  WAL with ``synchronous=NORMAL``; the sender did get success) after their journal entries were
  retired. Those files are found by ``cradle archive check --repair`` (``storage/check.py``), which
  an administrator runs after an unclean power-off; PostgreSQL commits are durable.

The archive is the primary copy and the index can be rebuilt from it: ``cradle archive check
--repair`` on an empty database (or one restored from an older backup) indexes every complete file
without a row and drops rows whose file is gone; series complete again after their quiet period
and are routed again. A file that is not structurally complete (``storage.dicomfile.check_file``:
only damage from outside, such as a disk error or a copy cut short, can put one there) is never
indexed, so never served: it is counted, logged by path and left for an administrator, and a
re-send of that instance replaces it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Row, select
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from storage.archive import Archive, ArchiveError, Data, PendingFile, StoredFile, content_hash
from storage.db import transaction
from storage.dicomfile import check_file
from storage.disk import Watermark
from storage.index import InstanceHeader, archived_copy, record_instance
from storage.models import Instance, Series

log = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    stored = "stored"
    duplicate = "duplicate"            # identical bytes already archived
    conflict_kept = "conflict_kept"    # different dataset under an archived SOP Instance UID, first kept
    conflict_replaced = "conflict_replaced"
    conflict_rejected = "conflict_rejected"


class TransientStoreError(Exception):
    """Disk or database trouble: nothing was committed; the sender should retry."""


class PermanentStoreError(Exception):
    """The index refused the data (a value it cannot hold, a constraint): nothing was committed, and
    a retry of the same data would fail the same way."""


_TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError, SQLAlchemyTimeoutError, DisconnectionError)
"""Connection lost or refused, server shutting down, lock or pool timeouts, serialization failures."""


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    sop_uid: str
    instance_pk: int | None
    series_pk: int | None
    reopened: bool = False
    study_pk: int | None = None
    series_instances: int | None = None
    """Instances the series holds with this one (counted when the header gives the expected count)."""


class Ingest:
    """The archive and the index together, with the policy for a re-used SOP Instance UID."""

    def __init__(self, archive: Archive, sessions: sessionmaker[Session], *,
                 duplicate_policy: str = "keep_first", watermark: Watermark | None = None) -> None:
        self.archive = archive
        self.sessions = sessions
        self.duplicate_policy = duplicate_policy
        self.watermark = watermark

    def store(self, encoded: Data, header: InstanceHeader, *, transfer_syntax_uid: str,
              calling_ae_title: str = "", is_result: bool = False) -> StoreResult:
        """Archive ``encoded`` (a complete DICOM file, as bytes or in parts) and commit its index rows.

        Returns only once both are durable; raises TransientStoreError when either failed,
        leaving no row without its file, and before writing anything when the archive's file system
        is below the watermark (``storage.min_free_bytes``). The node's own results (``is_result``)
        are small and finish work already accepted: they are stored below it.
        """
        if self.watermark is not None and not is_result:
            missing = self.watermark.shortfall(_size(encoded))
            if missing:
                raise TransientStoreError(f"archive file system below storage.min_free_bytes "
                                          f"({missing} bytes short)")
        try:
            # The file is written under a temporary name and fsynced in the background while it is
            # hashed, the index consulted and the row prepared, all in one transaction; the row
            # commits only after the file has its final name and both are on disk. A re-send that
            # is not stored again leaves nothing behind.
            pending = self.archive.write(header.relative_path, encoded)
            try:
                with transaction(self.sessions) as session:
                    existing = archived_copy(session, header.sop_uid)
                    not_stored = self._resend(existing, pending, header.sop_uid)
                    if not_stored is not None:
                        pending.discard()
                        return not_stored
                    recorded = record_instance(
                        session, header, pending.stored, transfer_syntax_uid=transfer_syntax_uid,
                        calling_ae_title=calling_ae_title, is_result=is_result)
                    pending.commit()
            except BaseException:
                pending.discard()
                raise
        except ArchiveError as exc:
            raise TransientStoreError(f"archive: {exc}") from exc
        except _TRANSIENT_DB_ERRORS as exc:
            # The file may be on disk under its final name without a row: the sender retries and
            # overwrites it, or the next start indexes it (its journal entry stays). Nothing is lost or half-written.
            raise TransientStoreError(f"index: {type(exc).__name__}") from exc
        except SQLAlchemyError as exc:  # DataError, IntegrityError, ...: the same data fails again
            raise PermanentStoreError(f"index: {type(exc).__name__}") from exc
        if existing is not None and existing.file_path != header.relative_path:
            self._drop_moved(existing.file_path, header.sop_uid)
        pending.retire()
        outcome = Outcome.conflict_replaced if existing is not None else Outcome.stored
        return StoreResult(outcome, header.sop_uid, recorded.instance_pk, recorded.series_pk, recorded.reopened,
                           recorded.study_pk, recorded.series_instances)

    def _resend(self, existing: Row | None, pending: PendingFile, sop_uid: str) -> StoreResult | None:
        """The answer to a re-sent SOP Instance UID (``existing``: its archived hash and path) that
        is not to be stored again, or None."""
        if existing is None or not self.archive.exists(existing.file_path):
            return None
        if existing.sha256 == pending.stored.sha256:
            return StoreResult(Outcome.duplicate, sop_uid, None, None)
        if self.duplicate_policy == "replace":
            return None
        outcome = Outcome.conflict_kept if self.duplicate_policy == "keep_first" else Outcome.conflict_rejected
        log.warning("SOP Instance UID %s re-sent with different content: %s", sop_uid, outcome.value)
        return StoreResult(outcome, sop_uid, None, None)

    def _drop_moved(self, old_path: str, sop_uid: str) -> None:
        """A replacement filed under other Study/Series UIDs: the row now names the new file, so the
        old one goes (a crash before this leaves it to ``cradle archive check --repair``, which removes it too)."""
        try:
            self.archive.remove(old_path)
        except OSError as exc:
            log.warning("SOP Instance UID %s: superseded file %s not removed (%s)", sop_uid, old_path,
                        exc.strerror or type(exc).__name__)

    def store_dataset(self, dataset: Dataset, *, is_result: bool = True) -> StoreResult:
        """Archive a dataset made here (an SR, SEG or SC result)."""
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return self.store(buffer.getvalue(), InstanceHeader.from_dataset(dataset),
                          transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID), is_result=is_result)

    def recover(self) -> "RecoveryReport":
        """At startup: finish the writes a crash interrupted, and nothing else (the journal in
        ``storage/archive.py``): remove their temporary files and index each renamed file whose row
        never committed. The time this takes grows with the writes in flight, not with the archive;
        the walk over every file is ``cradle archive check`` (``storage/check.py``)."""
        report = RecoveryReport()
        for entry in self.archive.interrupted_writes():
            try:
                if entry.temp is not None and entry.temp.exists():
                    entry.temp.unlink(missing_ok=True)
                    report.temporaries_removed += 1
                if entry.relative and self.archive.exists(entry.relative) and not self._indexed(entry.relative):
                    report.files_reindexed += self.reindex(entry.relative)
            except (InvalidDicomError, ValueError, AttributeError) as exc:
                log.warning("archive file %s could not be indexed: %s", entry.relative, type(exc).__name__)
                report.unreadable_files += 1
            except (OSError, SQLAlchemyError):
                entry.release()  # tried again on the next start
                raise
            report.interrupted_writes += 1
            entry.retire()
        return report

    def _indexed(self, path: str) -> bool:
        """Whether a row names ``path`` (looked up by the SOP Instance UID its name carries: the unique
        index the ingest keeps anyway, so no index on paths slows every insert)."""
        with self.sessions() as session:
            return session.scalar(select(Instance.file_path).where(Instance.sop_uid == sop_uid_of(path))) == path

    def reindex(self, path: str) -> bool:
        """Index the complete file ``path`` from its header; False when it is the leftover of an
        instance since replaced under other UIDs (then it is removed, never indexed back)."""
        data = self.archive.read(path)
        check_file(data)
        dataset = dcmread(BytesIO(data), stop_before_pixels=True)
        header = InstanceHeader.from_dataset(dataset)
        if header.relative_path != path:
            raise ValueError("file name does not match its UIDs")
        with transaction(self.sessions) as session:
            indexed = archived_copy(session, header.sop_uid)
            if indexed is not None and indexed.file_path != path and self.archive.exists(indexed.file_path):
                self._drop_moved(path, header.sop_uid)  # superseded by a replacement under other UIDs
                return False
            record_instance(session, header, StoredFile(path, len(data), content_hash(data)),
                            transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID))
        return True


def _size(data: Data) -> int:
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else sum(len(part) for part in data)


@dataclass
class RecoveryReport:
    """What a start found of the writes a crash interrupted."""

    interrupted_writes: int = 0
    temporaries_removed: int = 0
    files_reindexed: int = 0
    unreadable_files: int = 0


def sop_uid_of(path: str) -> str:
    """The SOP Instance UID an archive path is named by (``storage.archive.relative_path``)."""
    return path.rsplit("/", 1)[-1].removesuffix(".dcm")


def series_pk_of(session: Session, series_uid: str) -> int | None:
    return session.query(Series.id).filter(Series.series_uid == series_uid).scalar()


def dataset_path(archive: Archive, instance: Instance) -> Path:
    return archive.absolute(instance.file_path)
