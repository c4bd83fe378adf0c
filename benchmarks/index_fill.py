"""Fill an index with many rows at once (bulk INSERT; COPY on PostgreSQL), for the scale benchmark.

    python -m benchmarks.index_fill URL --instances 1000000 [--archive DIR]

The rows look like a few years of a neonatal unit: patients with two studies each, one series per
study (CR radiographs of one instance, MR series of ``mr_slices``), one job per series finished and
sent, a send per job, a label on every ``label_every``-th study. The files they name need not
exist (``--archive`` writes a small placeholder for each, e.g. to time a start against a full
archive). Ids are given explicitly and PostgreSQL's sequences moved past them, so the node carries
on inserting after them. Synthetic values only: no patient data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Table, func, select, text

from storage.archive import relative_path
from storage.db import create_db_engine, migrate
from storage.models import (
    DispatchState, Instance, Job, JobState, Patient, Send, Series, SeriesState, Study, StudyLabel,
)

CHUNK = 20_000
START = dt.datetime(2023, 1, 1)
SHA = hashlib.sha256(b"placeholder").hexdigest()
CR = "1.2.840.10008.5.1.4.1.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
UID_ROOT = "1.2.826.0.1.3680043.10.1173"  # synthetic UIDs, one per row id


@dataclass(frozen=True)
class Shape:
    """How ``instances`` rows are spread over patients, studies, series, jobs and labels."""

    instances: int
    mr_every: int = 10       # every 10th series is MR ...
    mr_slices: int = 40      # ... of this many slices; the rest are one-instance CR films
    label_every: int = 50    # every 50th study carries a bpd label
    days: int = 3 * 365      # arrivals spread over this many days

    def series_sizes(self) -> Iterator[int]:
        left, number = self.instances, 0
        while left > 0:
            size = min(left, self.mr_slices if number % self.mr_every == self.mr_every - 1 else 1)
            yield size
            left -= size
            number += 1


def _uid(kind: str, number: int) -> str:
    return f"{UID_ROOT}.{ {'study': 1, 'series': 2, 'sop': 3}[kind] }.{number}"


def fill(connection: Connection, shape: Shape, archive: Path | None = None) -> dict[str, int]:
    """Insert the rows of ``shape`` after those already there; returns how many of each."""
    first = {table: (connection.scalar(select(func.max(table.c.id))) or 0) + 1
             for table in (Patient.__table__, Study.__table__, Series.__table__, Instance.__table__, Job.__table__)}
    sizes = list(shape.series_sizes())
    studies = len(sizes)
    step = dt.timedelta(days=shape.days) / max(1, studies)
    study_ids = range(first[Study.__table__], first[Study.__table__] + studies)
    patients = (studies + 1) // 2
    _insert(connection, Patient.__table__, ({"id": first[Patient.__table__] + i, "patient_key": f"|BULK{first[Patient.__table__] + i}|",
                                             "patient_id": "", "issuer_of_patient_id": "", "patient_name": "",
                                             "sex": ""} for i in range(patients)))
    _insert(connection, Study.__table__, ({"id": s, "study_uid": _uid("study", s),
                                           "patient_pk": first[Patient.__table__] + i // 2, "accession_number": "",
                                           "study_description": "", "patient_age": "",
                                           "created_at": START + step * i} for i, s in enumerate(study_ids)))
    series_first = first[Series.__table__]
    _insert(connection, Series.__table__, (_series_row(series_first + i, s, size, START + step * i)
                                           for i, (s, size) in enumerate(zip(study_ids, sizes))))
    _insert(connection, Instance.__table__, _instance_rows(first[Instance.__table__], series_first, study_ids, sizes,
                                                           START, step, archive))
    job_first = first[Job.__table__]
    _insert(connection, Job.__table__, (_job_row(job_first + i, series_first + i, START + step * i)
                                        for i in range(studies)))
    _insert(connection, Send.__table__, ({"job_pk": job_first + i, "destination": "pacs", "sop_uid": _uid("sop", i),
                                          "round": 1, "attempt": 1, "status": 0, "error": "",
                                          "sent_at": START + step * i} for i in range(studies)))
    labels = [s for i, s in enumerate(study_ids) if i % shape.label_every == 0]
    _insert(connection, StudyLabel.__table__, ({"study_pk": s, "task": "bpd", "value": float(s % 2), "source": "bulk",
                                                "imported_at": START} for s in labels))
    _after_explicit_ids(connection)
    return {"patients": patients, "studies": studies, "series": studies, "instances": shape.instances,
            "jobs": studies, "labelled_studies": len(labels)}


def _series_row(pk: int, study_pk: int, size: int, at: dt.datetime) -> dict:
    return {"id": pk, "series_uid": _uid("series", pk), "study_pk": study_pk, "modality": "MR" if size > 1 else "CR",
            "body_part": "CHEST", "series_description": "", "protocol_name": "", "frame_of_reference_uid": "",
            "state": SeriesState.complete.value, "first_received_at": at, "last_received_at": at, "completed_at": at,
            "completions": 1, "routing_reason": "", "is_result": False}


def _instance_rows(first: int, series_first: int, study_ids: range, sizes: Sequence[int], start: dt.datetime,
                   step: dt.timedelta, archive: Path | None) -> Iterator[dict]:
    pk = first
    for i, (study_pk, size) in enumerate(zip(study_ids, sizes)):
        series_pk, at = series_first + i, start + step * i
        for number in range(1, size + 1):
            path = relative_path(_uid("study", study_pk), _uid("series", series_pk), _uid("sop", pk))
            if archive is not None:
                _placeholder(archive / path)
            yield {"id": pk, "sop_uid": _uid("sop", pk), "series_pk": series_pk, "sop_class_uid": MR if size > 1 else CR,
                   "instance_number": number, "view_position": "" if size > 1 else "AP", "image_type": "",
                   "transfer_syntax_uid": "1.2.840.10008.1.2.1", "file_path": path, "file_size": 1024,
                   "sha256": SHA, "calling_ae_title": "BULK", "received_at": at}
            pk += 1


def _job_row(pk: int, series_pk: int, at: dt.datetime) -> dict:
    return {"id": pk, "series_pk": series_pk, "pipeline": "cxr", "state": JobState.done.value, "attempts": 1,
            "generation": 1, "model_version": "bulk-1", "error": "", "lease_owner": "", "created_at": at,
            "enqueued_at": at, "started_at": at, "finished_at": at + dt.timedelta(seconds=2),
            "dispatch_state": DispatchState.sent.value, "dispatch_round": 1, "dispatch_attempts": 1,
            "dispatched_at": at + dt.timedelta(seconds=3)}


def _placeholder(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 1024)


def _insert(connection: Connection, table: Table, rows: Iterable[dict]) -> None:
    """Insert in chunks: COPY on PostgreSQL, an executemany INSERT elsewhere."""
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            _write(connection, table, chunk)
            chunk = []
    if chunk:
        _write(connection, table, chunk)


def _write(connection: Connection, table: Table, rows: list[dict]) -> None:
    """The driver's own bulk path: COPY (psycopg) or ``executemany`` of plain tuples (sqlite3), with
    datetimes in the text form SQLAlchemy reads back."""
    columns = list(rows[0])
    cursor = connection.connection.dbapi_connection.cursor()
    if connection.dialect.name == "postgresql":
        with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
        return
    marks = ", ".join("?" for _ in columns)
    cursor.executemany(f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})",
                       [tuple(_sqlite_value(row[c]) for c in columns) for row in rows])


def _sqlite_value(value: object) -> object:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, dt.datetime) else value


def _after_explicit_ids(connection: Connection) -> None:
    """Statistics for the planner; PostgreSQL's sequences past the explicit ids (and, after the
    commit, ``VACUUM``: the visibility map that lets counts read the indexes alone, as autovacuum
    keeps it on a table that grew over years)."""
    if connection.dialect.name == "postgresql":
        for table in ("patient", "study", "series", "instance", "job", "send", "study_label"):
            connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                    f"coalesce((SELECT max(id) FROM {table}), 1))"))
    connection.execute(text("ANALYZE"))


def fill_url(url: str, shape: Shape, archive: Path | None = None) -> tuple[dict[str, int], float]:
    """Migrate the index at ``url``, fill it; (counts, seconds)."""
    engine = create_db_engine(url)
    try:
        migrate(engine)
        started = time.perf_counter()
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":  # the indexes' pages stay in memory until the commit
                connection.exec_driver_sql("PRAGMA cache_size=-524288")
            counts = fill(connection, shape, archive)
        seconds = time.perf_counter() - started
        if engine.dialect.name == "postgresql":  # what autovacuum does to an index that grew over years
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("VACUUM ANALYZE"))
        return counts, seconds
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_fill", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="SQLAlchemy URL of the index")
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--archive", type=Path, default=None, help="write a 1 KiB placeholder file per row here")
    args = parser.parse_args(argv)
    counts, seconds = fill_url(args.url, Shape(args.instances), args.archive)
    print(f"{counts} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
