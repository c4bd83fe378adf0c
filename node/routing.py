"""Routing: which pipelines run on a complete series, decided by the rules in ``routing.rules``.

A rule matches when every criterion it sets matches (unset criteria match anything):

- ``modalities``: the series' Modality;
- ``sop_class_uids``: the SOP Class of at least one of the series' instances;
- ``body_parts``: Body Part Examined (upper case); ``""`` in the list means "not given";
- ``series_description_regex``: ``re.search`` on Series Description (add ``(?i)`` for any case);
- ``min_age_days`` / ``max_age_days``: the patient's age in days at the study, from Patient's Birth
  Date and Study Date, else from Patient's Age (``001D``, ``002W``, ``003M``, ``045Y``); a rule
  with an age bound does not match a patient of unknown age.

Every matching rule contributes its pipelines; a series gets one ``Job`` per pipeline. A series no
rule matches keeps the reason in ``Series.routing_reason``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config.settings import RoutingRule
from storage.models import Instance, Job, JobState, Patient, Retrieval, Series, Study, utcnow

_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at, read once from the index."""

    modality: str
    sop_class_uids: frozenset[str]
    body_part: str
    series_description: str
    age_days: int | None
    is_result: bool = False
    history_retrieval: int | None = None
    """The ``Retrieval`` row when the series arrived by a ``cradle retrieve`` without ``--run-pipelines``."""


@dataclass(frozen=True)
class RoutingDecision:
    pipelines: tuple[str, ...]
    rules: tuple[str, ...]
    reason: str

    @property
    def matched(self) -> bool:
        return bool(self.pipelines)


# --- patient age ------------------------------------------------------------------------------

def parse_age_string(value: str) -> int | None:
    """Days in a DICOM Age String (AS): ``001D`` → 1, ``002W`` → 14, ``045Y`` → 16436."""
    found = _AGE_STRING.match((value or "").strip().upper())
    if not found:
        return None
    return int(int(found.group(1)) * _DAYS_PER_UNIT[found.group(2)])


def age_in_days(birth_date: dt.date | None, study_date: dt.date | None, patient_age: str = "") -> int | None:
    """The patient's age in days at the study; Patient's Age when the dates cannot tell."""
    if birth_date is not None and study_date is not None and study_date >= birth_date:
        return (study_date - birth_date).days
    return parse_age_string(patient_age)


# --- rules ------------------------------------------------------------------------------------

def rule_mismatch(rule: RoutingRule, facts: SeriesFacts) -> tuple[int, str]:
    """(0, "") when ``rule`` matches, else how far it got (1 = failed on modality) and why."""
    checks = (
        _modality_mismatch, _sop_class_mismatch, _body_part_mismatch, _description_mismatch, _age_mismatch,
    )
    for stage, check in enumerate(checks, start=1):
        reason = check(rule, facts)
        if reason:
            return stage, reason
    return 0, ""


def _modality_mismatch(rule: RoutingRule, facts: SeriesFacts) -> str:
    allowed = {m.upper() for m in rule.modalities}
    if allowed and facts.modality.upper() not in allowed:
        return f"modality {_code(facts.modality) or '(none)'}"
    return ""


def _sop_class_mismatch(rule: RoutingRule, facts: SeriesFacts) -> str:
    if rule.sop_class_uids and not facts.sop_class_uids & set(rule.sop_class_uids):
        return f"SOP class {', '.join(sorted(facts.sop_class_uids)) or '(none)'}"
    return ""


def _body_part_mismatch(rule: RoutingRule, facts: SeriesFacts) -> str:
    allowed = {b.strip().upper() for b in rule.body_parts}
    if allowed and facts.body_part.strip().upper() not in allowed:
        return f"body part {_code(facts.body_part) or '(not given)'}"
    return ""


def _code(value: str) -> str:
    """A code string value (CS: upper case, digits, space, underscore; at most 16) as it may be
    logged; anything else is not shown (free text could carry anything)."""
    value = value.strip()
    return value if re.fullmatch(r"[A-Z0-9 _]{0,16}", value) else "(not a code string)"


def _description_mismatch(rule: RoutingRule, facts: SeriesFacts) -> str:
    if rule.series_description_regex is not None and not re.search(rule.series_description_regex,
                                                                    facts.series_description):
        return f"series description does not match /{rule.series_description_regex}/"
    return ""


def _age_mismatch(rule: RoutingRule, facts: SeriesFacts) -> str:
    if rule.min_age_days is None and rule.max_age_days is None:
        return ""
    if facts.age_days is None:
        return "patient age unknown"
    # The reason names the rule's bound, never the age: it is logged, and an age in days beside the
    # time of the log line gives the birth date.
    if rule.max_age_days is not None and facts.age_days > rule.max_age_days:
        return f"patient age above {rule.max_age_days} days"
    if rule.min_age_days is not None and facts.age_days < rule.min_age_days:
        return f"patient age below {rule.min_age_days} days"
    return ""


def decide(rules: Sequence[RoutingRule], facts: SeriesFacts) -> RoutingDecision:
    """The pipelines for a series (in rule order, each once) and a reason a person can read."""
    if facts.is_result:
        return RoutingDecision((), (), "result series made by this node: not routed")
    if facts.history_retrieval is not None:
        return RoutingDecision((), (), f"retrieved history (retrieval {facts.history_retrieval}): archived for "
                                       "training, not routed (cradle retrieve without --run-pipelines)")
    if not rules:
        return RoutingDecision((), (), "no routing rules configured")
    matched: list[RoutingRule] = []
    misses: list[tuple[int, str, str]] = []
    for rule in rules:
        stage, reason = rule_mismatch(rule, facts)
        if stage == 0:
            matched.append(rule)
        else:
            misses.append((stage, reason, rule.name))
    if matched:
        pipelines = tuple(dict.fromkeys(p for rule in matched for p in rule.pipelines))
        names = tuple(rule.name for rule in matched)
        return RoutingDecision(pipelines, names, f"matched {', '.join(names)}: {', '.join(pipelines)}")
    return RoutingDecision((), (), _no_match_reason(misses))


def _no_match_reason(misses: list[tuple[int, str, str]]) -> str:
    """The reasons of the rules that got furthest; "no rule matched: modality OT" when all stopped there."""
    furthest = max(stage for stage, _, _ in misses)
    reasons = [(reason, name) for stage, reason, name in misses if stage == furthest]
    if furthest == 1 and len({reason for reason, _ in reasons}) == 1:
        return f"no rule matched: {reasons[0][0]}"
    return "; ".join(f"{reason} for rule {name}" for reason, name in reasons)


# --- the index --------------------------------------------------------------------------------

def series_facts(session: Session, series_pk: int) -> SeriesFacts:
    series, study, patient = session.execute(
        select(Series, Study, Patient).join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id).where(Series.id == series_pk)).one()
    sop_classes = frozenset(session.scalars(
        select(Instance.sop_class_uid).where(Instance.series_pk == series_pk).distinct()))
    study_date = study.study_date or _first_acquisition_date(session, series_pk)
    return SeriesFacts(
        modality=series.modality, sop_class_uids=sop_classes, body_part=series.body_part,
        series_description=series.series_description,
        age_days=age_in_days(patient.birth_date, study_date, study.patient_age), is_result=series.is_result,
        history_retrieval=history_retrieval(session, study.study_uid, series.last_received_at))


def history_retrieval(session: Session, study_uid: str, last_received_at: dt.datetime | None) -> int | None:
    """The retrieval (``cradle retrieve`` without ``--run-pipelines``) that brought this series in: one
    of its study whose window (asked .. finished, or still running) holds the series' last arrival."""
    if last_received_at is None:
        return None
    unfinished_since = last_received_at - RETRIEVAL_OPEN_AT_MOST  # a retrieve killed before it finished
    return session.scalar(select(Retrieval.id).where(
        Retrieval.study_uid == study_uid, Retrieval.run_pipelines.is_(False),
        Retrieval.requested_at <= last_received_at,
        (Retrieval.finished_at.is_(None) & (Retrieval.requested_at >= unfinished_since))
        | (Retrieval.finished_at >= last_received_at))
        .order_by(Retrieval.id.desc()).limit(1))


RETRIEVAL_OPEN_AT_MOST = dt.timedelta(hours=24)
"""A retrieval never marked finished (its process was killed) covers arrivals for this long at most."""


def _first_acquisition_date(session: Session, series_pk: int) -> dt.date | None:
    first = session.scalar(select(Instance.acquisition_datetime).where(
        Instance.series_pk == series_pk, Instance.acquisition_datetime.is_not(None))
        .order_by(Instance.acquisition_datetime).limit(1))
    return first.date() if first else None


def create_jobs(session: Session, series_pk: int, pipelines: Iterable[str], *, shadow: str = "") -> list[int]:
    """One queued ``Job`` per pipeline for the series (shadow runs of model version ``shadow`` when
    given); an existing row is kept as it is. Safe when two processes do it at once (INSERT ... ON
    CONFLICT DO NOTHING on the unique series + pipeline + shadow)."""
    pipelines = list(dict.fromkeys(pipelines))
    if not pipelines:
        return []
    connection = session.connection()
    for pipeline in pipelines:
        connection.execute(_insert_ignoring_conflict(connection).values(
            series_pk=series_pk, pipeline=pipeline, shadow=shadow, state=JobState.queued, created_at=utcnow()))
    return job_ids(session, series_pk, pipelines, shadow=shadow)


def requeue_jobs(session: Session, series_pk: int, pipelines: Iterable[str], *, shadow: str = "") -> list[int]:
    """The jobs of a re-completed series are superseded: ``generation + 1``. One that is not running
    goes back to ``queued`` (attempts and error reset); a running one keeps its lease, and its worker
    re-queues it when it finishes, seeing the generation moved (``storage.jobs.complete``). Returns
    the ids of the re-queued jobs (to enqueue). Only the clinical runs, unless ``shadow`` names one:
    shadow runs follow their clinical run (the worker starts them when it is done)."""
    pipelines = list(pipelines)
    if not pipelines:
        return []
    mine = (Job.series_pk == series_pk, Job.pipeline.in_(pipelines), Job.shadow == shadow)
    session.execute(update(Job).where(*mine, Job.state == JobState.running)
                    .values(generation=Job.generation + 1).execution_options(synchronize_session=False))
    requeued = list(session.scalars(select(Job.id).where(*mine, Job.state != JobState.running)))
    if requeued:
        session.execute(
            update(Job).where(Job.id.in_(requeued))
            .values(state=JobState.queued, generation=Job.generation + 1, attempts=0, error="", lease_owner="",
                    lease_expires_at=None, enqueued_at=None, started_at=None, finished_at=None)
            .execution_options(synchronize_session=False))
    return requeued


def start_shadow_jobs(session: Session, series_pk: int, pipeline: str, versions: Iterable[str]) -> list[int]:
    """After the clinical run of ``pipeline`` on the series: one queued shadow job per model version in
    shadow (created, or re-queued when an earlier run of it exists). Returns the ids to enqueue."""
    ids = []
    for version in dict.fromkeys(versions):
        existing = job_ids(session, series_pk, [pipeline], shadow=version)
        ids += requeue_jobs(session, series_pk, [pipeline], shadow=version) if existing else \
            create_jobs(session, series_pk, [pipeline], shadow=version)
    return ids


def job_ids(session: Session, series_pk: int, pipelines: Sequence[str], *, shadow: str = "") -> list[int]:
    rows = dict(session.execute(select(Job.pipeline, Job.id).where(
        Job.series_pk == series_pk, Job.pipeline.in_(pipelines), Job.shadow == shadow)).all())
    return [rows[p] for p in pipelines if p in rows]


def _insert_ignoring_conflict(connection: Connection):  # noqa: ANN202 - dialect-specific Insert
    dialect = connection.dialect.name
    unique = ["series_pk", "pipeline", "shadow"]
    if dialect == "postgresql":
        return postgresql.insert(Job).on_conflict_do_nothing(index_elements=unique)
    if dialect == "sqlite":
        return sqlite.insert(Job).on_conflict_do_nothing(index_elements=unique)
    raise NotImplementedError(f"job creation on {dialect}")


def route_series(session: Session, series: Series, rules: Sequence[RoutingRule]) -> tuple[RoutingDecision, list[int]]:
    """Decide for a series that has just completed, record why, and create its jobs (or, for a
    re-completed series, supersede the existing ones). Returns the decision and the ids of the jobs
    to enqueue (a running job is not among them: its worker re-queues it)."""
    decision = decide(rules, series_facts(session, series.id))
    series.routing_reason = decision.reason
    if not decision.matched:
        return decision, []
    existing = set(job_ids(session, series.id, decision.pipelines))
    requeued = set(requeue_jobs(session, series.id, decision.pipelines))
    created = create_jobs(session, series.id, decision.pipelines)
    return decision, [job_id for job_id in created if job_id not in existing or job_id in requeued]
