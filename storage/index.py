"""Recording archived instances in the index, and reading back what routing and status need."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM
from sqlalchemy import Connection, Insert, Row, Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.archive import StoredFile, relative_path
from storage.models import Instance, Job, Patient, Series, SeriesState, Study, utcnow


class MissingIdentifiers(ValueError):
    """The dataset lacks a Study, Series or SOP Instance UID (or its SOP Class UID)."""


class InvalidIdentifiers(ValueError):
    """A Study, Series, SOP Instance or SOP Class UID is not a UID (PS3.5 9.1: digits and dots, at most
    64 characters). Refused rather than made safe: two different invalid UIDs could otherwise be
    made into one file name or one index key."""


UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64

INDEX_INT_MIN, INDEX_INT_MAX = -(2 ** 31), 2 ** 31 - 1
"""What the index's INTEGER columns hold (PostgreSQL's 4 bytes): a header value outside is stored as
unknown (NULL), never merged, never a reason to refuse the instance."""


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    # NUL and lone surrogates: PostgreSQL text cannot hold them (a DataError on every retry)
    text = str(value).replace("\0", "").encode("utf-8", "replace").decode("utf-8")
    return text.strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    if number is not None and not INDEX_INT_MIN <= number <= INDEX_INT_MAX:
        return None
    return number


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID element's value, checked (see InvalidIdentifiers); "" when absent."""
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        raise InvalidIdentifiers(f"{keyword} has more than one value")
    text = str(value).strip().rstrip("\0").strip()
    if text and (len(text) > UID_MAX_LENGTH or not UID_PATTERN.match(text)):
        raise InvalidIdentifiers(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)")
    return text


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def parse_date(value: object) -> dt.date | None:
    try:
        parsed = DA(value) if value else None
    except (TypeError, ValueError):
        return None
    return dt.date(parsed.year, parsed.month, parsed.day) if parsed else None


def parse_datetime(date_value: object, time_value: object) -> dt.datetime | None:
    day = parse_date(date_value)
    if day is None:
        return None
    try:
        moment = TM(time_value) if time_value else None
    except (TypeError, ValueError):
        moment = None
    return dt.datetime.combine(day, moment.replace(tzinfo=None) if moment else dt.time())


def _acquisition_datetime(ds: Dataset) -> dt.datetime | None:
    if ds.get("AcquisitionDateTime"):
        try:
            value = DT(ds.AcquisitionDateTime)
            return value.replace(tzinfo=None) if value else None
        except (TypeError, ValueError):
            return None
    return parse_datetime(ds.get("AcquisitionDate") or ds.get("ContentDate"),
                          ds.get("AcquisitionTime") or ds.get("ContentTime"))


@dataclass(frozen=True)
class InstanceHeader:
    """What the index keeps of one instance, read from its header (no pixel data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    birth_date: dt.date | None = None
    sex: str = ""
    study_date: dt.date | None = None
    study_datetime: dt.datetime | None = None
    accession_number: str = ""
    study_description: str = ""
    patient_age: str = ""
    patient_weight_kg: float | None = None
    modality: str = ""
    body_part: str = ""
    series_description: str = ""
    protocol_name: str = ""
    series_number: int | None = None
    frame_of_reference_uid: str = ""
    expected_count: int | None = None
    instance_number: int | None = None
    view_position: str = ""
    image_type: str = ""
    acquisition_datetime: dt.datetime | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "InstanceHeader":
        uids = {k: _uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
        missing = [k for k, v in uids.items() if not v]
        if missing:
            raise MissingIdentifiers(f"dataset lacks {', '.join(missing)}")
        return cls(
            study_uid=uids["StudyInstanceUID"], series_uid=uids["SeriesInstanceUID"],
            sop_uid=uids["SOPInstanceUID"], sop_class_uid=uids["SOPClassUID"],
            patient_id=_text(ds, "PatientID"), issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName", 324), birth_date=parse_date(ds.get("PatientBirthDate")),
            sex=_text(ds, "PatientSex", 16), study_date=parse_date(ds.get("StudyDate")),
            study_datetime=parse_datetime(ds.get("StudyDate"), ds.get("StudyTime")),
            accession_number=_text(ds, "AccessionNumber"), study_description=_text(ds, "StudyDescription"),
            patient_age=_text(ds, "PatientAge", 16), patient_weight_kg=_float(ds, "PatientWeight"),
            modality=_text(ds, "Modality", 16), body_part=_text(ds, "BodyPartExamined").upper(),
            series_description=_text(ds, "SeriesDescription"), protocol_name=_text(ds, "ProtocolName"),
            series_number=_int(ds, "SeriesNumber"), frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
            expected_count=_int(ds, "ImagesInAcquisition"), instance_number=_int(ds, "InstanceNumber"),
            view_position=_text(ds, "ViewPosition", 16), image_type=_text(ds, "ImageType", 128),
            acquisition_datetime=_acquisition_datetime(ds), rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
            number_of_frames=_int(ds, "NumberOfFrames"),
        )

    @property
    def relative_path(self) -> str:
        return relative_path(self.study_uid, self.series_uid, self.sop_uid)

    @property
    def patient_key(self) -> str:
        birth = self.birth_date.isoformat() if self.birth_date else ""
        return f"{self.issuer_of_patient_id}|{self.patient_id}|{birth}"


def _get_or_create(session: Session, model: type, lookup: dict, values: dict):  # noqa: ANN202
    """The row matching ``lookup``, created with ``values`` if absent (safe against a concurrent insert).

    ``INSERT ... ON CONFLICT DO NOTHING`` rather than catching the unique violation: PostgreSQL logs
    a violation with a DETAIL line quoting the key, and the patient key is the patient's ID and
    birth date — which must stay out of every log, the database server's included."""
    row = session.scalar(select(model).filter_by(**lookup))
    if row is not None:
        return row
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(insert(model).values(**lookup, **values).on_conflict_do_nothing(index_elements=list(lookup)))
        return session.scalar(select(model).filter_by(**lookup))
    try:
        with session.begin_nested():
            row = model(**lookup, **values)
            session.add(row)
    except IntegrityError:
        row = session.scalar(select(model).filter_by(**lookup))
        if row is None:
            raise
    return row


def _new_series(session: Session, header: InstanceHeader, is_result: bool) -> Series:
    """The series row of ``header`` (and its study and patient rows, when they are new)."""
    patient = _get_or_create(session, Patient, {"patient_key": header.patient_key}, {
        "patient_id": header.patient_id, "issuer_of_patient_id": header.issuer_of_patient_id,
        "patient_name": header.patient_name, "birth_date": header.birth_date, "sex": header.sex})
    study = _get_or_create(session, Study, {"study_uid": header.study_uid}, {
        "patient_pk": patient.id, "study_date": header.study_date, "study_datetime": header.study_datetime,
        "accession_number": header.accession_number, "study_description": header.study_description,
        "patient_age": header.patient_age, "patient_weight_kg": header.patient_weight_kg})
    return _get_or_create(session, Series, {"series_uid": header.series_uid}, {
        "study_pk": study.id, "modality": header.modality, "body_part": header.body_part,
        "series_description": header.series_description, "protocol_name": header.protocol_name,
        "series_number": header.series_number, "frame_of_reference_uid": header.frame_of_reference_uid,
        "expected_count": header.expected_count, "is_result": is_result})


@dataclass(frozen=True)
class Recorded:
    """What recording one instance did."""

    instance_pk: int
    series_pk: int
    study_pk: int
    reopened: bool
    """The series was complete: this is a late instance."""
    series_instances: int | None
    """How many instances the series holds now (with this one); counted only when the header says how
    many to expect (Images in Acquisition), for completion."""


_SERIES = Series.__table__
_INSTANCE = Instance.__table__
_INSTANCE_COLUMNS = ("sop_class_uid", "instance_number", "view_position", "image_type", "acquisition_datetime",
                     "rows", "columns", "number_of_frames")
_INSTANCE_VALUES = ("series_pk", *_INSTANCE_COLUMNS, "transfer_syntax_uid", "file_path", "file_size", "sha256",
                    "calling_ae_title", "received_at")

# Built once: a statement built per instance costs more than executing it.
_SERIES_OF_UID = (select(_SERIES.c.id, _SERIES.c.study_pk, _SERIES.c.state, _SERIES.c.expected_count)
                  .where(_SERIES.c.series_uid == bindparam("series_uid")).with_for_update())
_TOUCH_SERIES = (update(_SERIES).where(_SERIES.c.id == bindparam("series_pk"))
                 .values(last_received_at=bindparam("now"), state=bindparam("new_state"),
                         expected_count=bindparam("new_expected_count")))
_INSTANCES_IN_SERIES = select(func.count()).select_from(_INSTANCE).where(_INSTANCE.c.series_pk == bindparam("series_pk"))
_ARCHIVED_COPY = select(_INSTANCE.c.sha256, _INSTANCE.c.file_path).where(_INSTANCE.c.sop_uid == bindparam("sop_uid"))


def _upsert(insert: Callable[[Table], Insert]) -> Insert:
    statement = insert(_INSTANCE)
    return (statement.on_conflict_do_update(index_elements=["sop_uid"],
                                            set_={key: statement.excluded[key] for key in _INSTANCE_VALUES})
            .returning(_INSTANCE.c.id))


_UPSERT_INSTANCE = {"postgresql": _upsert(postgresql.insert), "sqlite": _upsert(sqlite.insert)}


def archived_copy(session: Session, sop_uid: str) -> Row | None:
    """The hash and file path (``sha256``, ``file_path``) indexed for a SOP Instance UID, if any."""
    return session.connection().execute(_ARCHIVED_COPY, {"sop_uid": sop_uid}).first()


def record_instance(session: Session, header: InstanceHeader, stored: StoredFile, *,
                    transfer_syntax_uid: str, calling_ae_title: str = "",
                    is_result: bool = False) -> Recorded:
    """Insert (or refresh) the rows for one archived instance, in the caller's transaction.

    Core statements, not ORM objects: this runs once per received instance, before the sender is
    answered (``benchmarks/ingest.py``: the ORM's unit of work cost more than the rest of the
    handler). The series row is read under a row lock (PostgreSQL; a SQLite write transaction holds
    the database) and updated before the instances are counted: two associations ending the same
    series take turns, and the second counts the first's instance."""
    connection = session.connection()
    row = connection.execute(_SERIES_OF_UID, {"series_uid": header.series_uid}).first()
    if row is None:
        series = _new_series(session, header, is_result)
        series_pk, study_pk, state, expected = series.id, series.study_pk, series.state, series.expected_count
    else:
        series_pk, study_pk, state, expected = row
    now = utcnow()
    reopened = SeriesState(state) == SeriesState.complete
    connection.execute(_TOUCH_SERIES, {
        "series_pk": series_pk, "now": now, "new_state": SeriesState.receiving if reopened else SeriesState(state),
        "new_expected_count": expected or header.expected_count})
    values = {key: getattr(header, key) for key in _INSTANCE_COLUMNS}
    values.update(sop_uid=header.sop_uid, series_pk=series_pk, transfer_syntax_uid=transfer_syntax_uid,
                  file_path=stored.relative_path, file_size=stored.size, sha256=stored.sha256,
                  calling_ae_title=calling_ae_title, received_at=now)
    instance_pk = _upsert_instance(connection, values)
    count = (connection.execute(_INSTANCES_IN_SERIES, {"series_pk": series_pk}).scalar_one()
             if header.expected_count else None)
    return Recorded(instance_pk, series_pk, study_pk, reopened, count)


def _upsert_instance(connection: Connection, values: dict[str, object]) -> int:
    """The instance row's id, inserted, or updated in place when its SOP Instance UID is indexed."""
    upsert = _UPSERT_INSTANCE.get(connection.dialect.name)
    if upsert is not None:
        return connection.execute(upsert, values).scalar_one()
    existing = connection.execute(select(_INSTANCE.c.id).where(_INSTANCE.c.sop_uid == values["sop_uid"])).scalar()
    if existing is None:
        return connection.execute(_INSTANCE.insert().values(**values)).inserted_primary_key[0]
    connection.execute(_INSTANCE.update().where(_INSTANCE.c.id == existing).values(**values))
    return existing


def counts(session: Session) -> dict[str, object]:
    """What ``cradle status --json`` prints."""
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    return {
        "patients": session.scalar(select(func.count()).select_from(Patient)),
        "studies": session.scalar(select(func.count()).select_from(Study)),
        "series": session.scalar(select(func.count()).select_from(Series)),
        "instances": session.scalar(select(func.count()).select_from(Instance)),
        "jobs": {state.value if hasattr(state, "value") else str(state): n for state, n in jobs.items()},
    }
