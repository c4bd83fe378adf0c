"""The index: patients, studies, series, instances, and the jobs and sends that follow from them.

The archive's files are the data; these rows say where they are and what routing needs.
Identifiers of patients (ID, name, birth date, accession number) live here and nowhere in logs.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    JSON, BigInteger, Date, DateTime, Enum, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState(str, enum.Enum):
    receiving = "receiving"
    complete = "complete"


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    skipped = "skipped"


class DispatchState(str, enum.Enum):
    """Where a job's results are on their way to the destinations (see node/dispatch.py)."""

    none = "none"          # nothing to send (yet): no output, or no destination configured
    pending = "pending"    # due at dispatch_due_at
    sent = "sent"          # every result instance acknowledged by every destination
    failed = "failed"      # gave up after dispatch.max_attempts; the job is failed too


class Patient(Base):
    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_key: Mapped[str] = mapped_column(String(200), unique=True,
                                             doc="issuer|id|birth date: one row per patient")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    sex: Mapped[str] = mapped_column(String(16), default="")

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    study_datetime: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    patient_age: Mapped[str] = mapped_column(String(16), default="")
    patient_weight_kg: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")
    labels: Mapped[list[StudyLabel]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    protocol_name: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    frame_of_reference_uid: Mapped[str] = mapped_column(String(64), default="")
    expected_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[SeriesState] = mapped_column(Enum(SeriesState, native_enum=False, length=16),
                                               default=SeriesState.receiving, index=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    completions: Mapped[int] = mapped_column(Integer, default=0)
    routing_reason: Mapped[str] = mapped_column(Text, default="")
    is_result: Mapped[bool] = mapped_column(default=False, doc="created by this node (SR, SEG, SC)")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    view_position: Mapped[str] = mapped_column(String(16), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")
    acquisition_datetime: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(String(400), doc="relative to the archive root")
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (
        # "received" (status, scrape) read from the index alone: the last 24 h as a range, all time as
        # a scan of an index much narrower than the rows
        Index("ix_instance_received", "received_at", "series_pk", "file_size"),
    )


class Job(Base):
    """One pipeline on one series. The row is the truth; the broker only carries its id.

    ``shadow`` is empty for the clinical run; a shadow run (``cradle models shadow``) names the model
    version it runs instead of its task's active one: its results are archived and sent only to
    destinations marked ``research``."""

    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("series_pk", "pipeline", "shadow", name="uq_job_series_pipeline_shadow"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(32))
    shadow: Mapped[str] = mapped_column(String(64), default="", server_default="",
                                        doc="model version of a shadow run; empty for the clinical run")
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16),
                                            default=JobState.queued, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=1, doc="bumped when a late instance re-opens the series")
    model_version: Mapped[str] = mapped_column(String(128), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    lease_owner: Mapped[str] = mapped_column(String(128), default="")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    dispatch_state: Mapped[DispatchState] = mapped_column(
        Enum(DispatchState, native_enum=False, length=16), default=DispatchState.none, index=True)
    dispatch_round: Mapped[int] = mapped_column(Integer, default=0,
                                                doc="bumped for each new output or forced re-send")
    dispatch_attempts: Mapped[int] = mapped_column(Integer, default=0, doc="attempts in this round")
    dispatch_due_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    series: Mapped[Series] = relationship(back_populates="jobs")
    sends: Mapped[list[Send]] = relationship(back_populates="job")


class Send(Base):
    """One C-STORE of one result instance to one destination."""

    __tablename__ = "send"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer, default=1, doc="the job's dispatch_round when sent")
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="DIMSE status, None when no answer")
    error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)

    job: Mapped[Job] = relationship(back_populates="sends")

    __table_args__ = (
        Index("ix_send_destination_status", "destination", "status"),  # sends by destination, from the index alone
    )


class RetrievalState(str, enum.Enum):
    retrieving = "retrieving"  # asked of the source; instances may be arriving
    retrieved = "retrieved"    # the index holds as many instances of the study as the source reported
    failed = "failed"          # refused, interrupted, or fewer instances than reported (reason says which)


class Retrieval(Base):
    """One study the node asked a source for (``cradle retrieve``): the history marker.

    Completion consults it: a series of this study whose last instance arrived while it was being
    retrieved (``requested_at`` .. ``finished_at``) is archived for training and not routed (no job,
    nothing sent), unless ``run_pipelines``. The key row is referred to by its line/position only:
    no accession number or patient ID is kept here."""

    __tablename__ = "retrieval"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8), doc="move or get")
    run_pipelines: Mapped[bool] = mapped_column(default=False)
    state: Mapped[RetrievalState] = mapped_column(Enum(RetrievalState, native_enum=False, length=16),
                                                  default=RetrievalState.retrieving, index=True)
    expected_instances: Mapped[int | None] = mapped_column(Integer, nullable=True,
                                                           doc="NumberOfStudyRelatedInstances at the source")
    archived_instances: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="in the index afterwards")
    reason: Mapped[str] = mapped_column(Text, default="")
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class StudyLabel(Base):
    """An outcome attached to a study for training (e.g. bpd = 1)."""

    __tablename__ = "study_label"
    __table_args__ = (UniqueConstraint("study_pk", "task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    task: Mapped[str] = mapped_column(String(32), index=True)
    value: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(200), default="")
    imported_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="labels")


class PruneState(str, enum.Enum):
    pruning = "pruning"  # files being removed; rows still there (``cradle archive prune`` finishes it)
    pruned = "pruned"    # files and rows gone


class PrunedStudy(Base):
    """A study ``cradle archive prune`` deleted (or is deleting): the marker that makes a prune
    resumable after a crash, and what a training manifest that names the study is checked against."""

    __tablename__ = "pruned_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[PruneState] = mapped_column(Enum(PruneState, native_enum=False, length=16),
                                              default=PruneState.pruning, index=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    rule: Mapped[str] = mapped_column(String(32), default="", doc="max_age_days or target_free_bytes")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
