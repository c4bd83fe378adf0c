"""Retention: which studies ``cradle archive prune`` may delete, and deleting them so that a crash
at any point leaves the index, the archive and the job table consistent.

Eligible (:func:`plan`): every series of the study complete, and every job on it finished (done or
skipped) with its results delivered or nothing to send; a study that matched no rule has no job and
is eligible too. Never (unless the policy says otherwise) a study with imported labels or one a
registered model version was trained on (``protected``: the study UIDs of their manifests, given by
the caller). Oldest first by arrival (``study.created_at``): those older than ``max_age_days``, then,
while the file system is short of ``target_free_bytes``, the next oldest whatever their age.

One study at a time (:meth:`Pruner.prune`):

1. a ``pruned_study`` row in state ``pruning`` is committed: the marker;
2. the study's directory is removed from the archive (and the removal fsynced);
3. the deletion is written to the audit trail;
4. in one transaction its sends, jobs, instances, series, labels and study rows are deleted (and its
   patient's, when no other study is left) and the marker becomes ``pruned``.

A crash after 1 leaves a marker in ``pruning``: the next prune (:meth:`Pruner.resume`) repeats 2 to
4, which are idempotent (the audit trail may then name that study twice, never not at all). Files never outlive their rows' marker, so no check or start ever indexes
a pruned study back; rows never lose their files without the marker saying why.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from common.files import fsync_directory
from storage.archive import Archive, safe_component
from storage.audit import audit
from storage.db import transaction
from storage.models import (
    DispatchState, Instance, Job, JobState, Patient, PrunedStudy, PruneState, Send, Series, SeriesState, Study,
    StudyLabel, utcnow,
)

log = logging.getLogger(__name__)

RULE_AGE = "max_age_days"
RULE_SPACE = "target_free_bytes"


@dataclass(frozen=True)
class Policy:
    max_age_days: int | None = None
    shortfall_bytes: int = 0
    """How many bytes the file system is short of ``retention.target_free_bytes`` now."""
    keep_labelled: bool = True
    protected: frozenset[str] = field(default_factory=frozenset)
    """Study UIDs kept whatever their age (those of registered model versions' manifests)."""


@dataclass(frozen=True)
class Candidate:
    study_pk: int
    study_uid: str
    instances: int
    bytes: int
    rule: str


def _settled() -> object:
    """Studies whose every job finished with its results delivered (or nothing to send), whose every
    series is complete."""
    open_series = exists().where(Series.study_pk == Study.id, Series.state != SeriesState.complete)
    finished = and_(Job.state.in_((JobState.done, JobState.skipped)),
                    Job.dispatch_state.in_((DispatchState.sent, DispatchState.none)))
    pending_job = exists().where(Series.study_pk == Study.id, Job.series_pk == Series.id, ~finished)
    return and_(~open_series, ~pending_job)


def _oldest_eligible(session: Session, keep_labelled: bool) -> Iterator[tuple[int, str, dt.datetime]]:
    query = select(Study.id, Study.study_uid, Study.created_at).where(_settled())
    if keep_labelled:
        query = query.where(~exists().where(StudyLabel.study_pk == Study.id))
    yield from session.execute(query.order_by(Study.created_at, Study.id)).yield_per(500)


def study_size(session: Session, study_pk: int) -> tuple[int, int]:
    """(instances, bytes) the index holds of the study."""
    count, size = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.file_size), 0))
        .join(Series, Series.id == Instance.series_pk).where(Series.study_pk == study_pk)).one()
    return int(count), int(size)


def plan(session: Session, policy: Policy, now: dt.datetime | None = None) -> list[Candidate]:
    """The studies to delete under ``policy``, oldest first (nothing is changed)."""
    if policy.max_age_days is None and policy.shortfall_bytes <= 0:
        return []
    cutoff = (now or utcnow()) - dt.timedelta(days=policy.max_age_days) if policy.max_age_days else None
    needed, chosen = policy.shortfall_bytes, []
    for study_pk, study_uid, created_at in _oldest_eligible(session, policy.keep_labelled):
        aged = cutoff is not None and created_at < cutoff
        if not aged and needed <= 0:
            break  # the rest are younger still, and enough space is planned
        if study_uid in policy.protected:
            continue
        instances, size = study_size(session, study_pk)
        chosen.append(Candidate(study_pk, study_uid, instances, size, RULE_AGE if aged else RULE_SPACE))
        needed -= size
    return chosen


class Pruner:
    """Deletes studies from the archive and the index in the order the module's docstring gives."""

    def __init__(self, archive: Archive, sessions: sessionmaker[Session]) -> None:
        self.archive = archive
        self.sessions = sessions

    def prune(self, candidates: Iterable[Candidate]) -> list[Candidate]:
        done = []
        for candidate in candidates:
            self._mark(candidate)
            self._finish(candidate)
            done.append(candidate)
        return done

    def resume(self) -> list[Candidate]:
        """Finish the deletions a crash interrupted (markers left in ``pruning``)."""
        with self.sessions() as session:
            interrupted = session.execute(
                select(PrunedStudy.study_uid, PrunedStudy.instances, PrunedStudy.bytes, PrunedStudy.rule)
                .where(PrunedStudy.state == PruneState.pruning).order_by(PrunedStudy.id)).all()
            candidates = [Candidate(session.scalar(select(Study.id).where(Study.study_uid == uid)) or 0,
                                    uid, instances, size, rule) for uid, instances, size, rule in interrupted]
        for candidate in candidates:
            self._finish(candidate)
        return candidates

    def _mark(self, candidate: Candidate) -> None:
        with transaction(self.sessions) as session:
            marker = session.scalar(select(PrunedStudy).where(PrunedStudy.study_uid == candidate.study_uid))
            if marker is None:  # a study pruned before, sent again, and pruned again re-uses its marker
                marker = PrunedStudy(study_uid=candidate.study_uid)
                session.add(marker)
            marker.state, marker.instances, marker.bytes = PruneState.pruning, candidate.instances, candidate.bytes
            marker.rule, marker.started_at, marker.finished_at = candidate.rule, utcnow(), None

    def _finish(self, candidate: Candidate) -> None:
        """Steps 2-4; the audit event is written once the files are gone and before the rows go, so a
        crash can repeat it (the resumed study) but never lose it."""
        self._remove_files(candidate.study_uid)
        audit("study.pruned", study_uid=candidate.study_uid, study_pk=candidate.study_pk,
              instances=candidate.instances, bytes=candidate.bytes, rule=candidate.rule)
        with transaction(self.sessions) as session:
            _delete_rows(session, candidate.study_uid)
            session.execute(PrunedStudy.__table__.update().where(PrunedStudy.study_uid == candidate.study_uid)
                            .values(state=PruneState.pruned, finished_at=utcnow()))
        log.info("study %s pruned (%s): %d instances, %d bytes", candidate.study_uid, candidate.rule,
                 candidate.instances, candidate.bytes)

    def _remove_files(self, study_uid: str) -> None:
        directory = self.archive.absolute(safe_component(study_uid))
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:  # removed before a crash
            pass
        if self.archive.fsync and self.archive.root.exists():
            fsync_directory(self.archive.root)


def _delete_rows(session: Session, study_uid: str) -> None:
    """Every row of the study, children first (foreign keys); its patient when no other study is left."""
    study_pk, patient_pk = session.execute(select(Study.id, Study.patient_pk)
                                           .where(Study.study_uid == study_uid)).one_or_none() or (None, None)
    if study_pk is None:
        return
    series = select(Series.id).where(Series.study_pk == study_pk).scalar_subquery()
    jobs = select(Job.id).where(Job.series_pk.in_(series)).scalar_subquery()
    session.execute(delete(Send).where(Send.job_pk.in_(jobs)))
    session.execute(delete(Job).where(Job.series_pk.in_(series)))
    session.execute(delete(Instance).where(Instance.series_pk.in_(series)))
    session.execute(delete(Series).where(Series.study_pk == study_pk))
    session.execute(delete(StudyLabel).where(StudyLabel.study_pk == study_pk))
    session.execute(delete(Study).where(Study.id == study_pk))
    if session.scalar(select(Study.id).where(Study.patient_pk == patient_pk).limit(1)) is None:
        session.execute(delete(Patient).where(Patient.id == patient_pk))


def pruned_studies(session: Session, study_uids: Iterable[str]) -> dict[str, dt.datetime]:
    """Of ``study_uids``, those pruned and not sent again since, with when (a training manifest that
    names them is told so when read)."""
    uids, found = sorted(set(study_uids)), {}
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        rows = session.execute(
            select(PrunedStudy.study_uid, PrunedStudy.finished_at, PrunedStudy.started_at)
            .where(PrunedStudy.study_uid.in_(chunk), or_(PrunedStudy.state == PruneState.pruning,
                   ~exists().where(Study.study_uid == PrunedStudy.study_uid)))).all()
        found.update({uid: finished or started for uid, finished, started in rows})
    return found
