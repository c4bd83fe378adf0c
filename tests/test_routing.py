"""Completion and routing: the rules on their own, then on the index (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import replace

import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import RoutingRule, load_settings
from node.completion import Completion, CompletionMonitor, complete_on_arrival
from node.routing import SeriesFacts, age_in_days, create_jobs, decide, parse_age_string
from storage.db import transaction
from storage.ingest import Ingest
from storage.models import Job, JobState, Series, SeriesState, utcnow
from test_storage import archive, file_bytes, header_of, index_url, ingest, make_image, make_mr_slice, sessions  # noqa: F401
from test_listener import Enqueued, enqueued  # noqa: F401 - the fixture

DEFAULT_RULES = load_settings(None).routing.rules


def facts(**overrides) -> SeriesFacts:  # noqa: ANN003 - SeriesFacts fields
    values = {"modality": "CR", "sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.1"}), "body_part": "CHEST",
              "series_description": "", "age_days": 1}
    return SeriesFacts(**{**values, **overrides})


# --- the rules alone ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "days"), [
    ("001D", 1), ("002W", 14), ("001M", 30), ("045Y", 16436), ("000Y", 0), ("1D", None), ("", None), ("12X", None),
])
def test_age_strings(value: str, days: int | None) -> None:
    assert parse_age_string(value) == days


def test_age_from_dates_before_age_string() -> None:
    assert age_in_days(dt.date(2026, 1, 1), dt.date(2026, 1, 3), "045Y") == 2
    assert age_in_days(None, dt.date(2026, 1, 3), "003D") == 3
    assert age_in_days(dt.date(2026, 1, 5), dt.date(2026, 1, 3), "") is None  # born after the study: unknown


def test_neonatal_radiograph_matches_the_default_rule() -> None:
    decision = decide(DEFAULT_RULES, facts())
    assert decision.pipelines == ("cxr",) and decision.rules == ("pediatric-radiograph",)


@pytest.mark.parametrize("overrides", [{"age_days": 3 * 365}, {"age_days": 6570, "body_part": "HAND"},
                                       {"body_part": "SKULL"}, {"body_part": "FOREARM", "age_days": 9 * 365}])
def test_every_childs_radiograph_goes_to_the_radiograph_pipeline(overrides: dict) -> None:
    """The view model then decides which findings apply (tests/test_populations.py)."""
    assert decide(DEFAULT_RULES, replace(facts(), **overrides)).pipelines == ("cxr",)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"age_days": 16436}, "patient age above 6570 days for rule pediatric-radiograph"),
    ({"age_days": 6571}, "patient age above 6570 days for rule pediatric-radiograph"),
    ({"modality": "OT"}, "no rule matched: modality OT"),
    ({"age_days": None}, "patient age unknown for rule pediatric-radiograph"),
])
def test_no_match_says_why(overrides: dict, reason: str) -> None:
    decision = decide(DEFAULT_RULES, facts(**overrides))
    assert (decision.matched, decision.reason) == (False, reason)


def test_missing_body_part_matches_the_empty_string() -> None:
    assert decide(DEFAULT_RULES, facts(body_part="")).matched


def test_sop_class_regex_and_minimum_age() -> None:
    rule = RoutingRule(name="dx-ap", pipelines=["view"], sop_class_uids=[DigitalXRayImageStorageForPresentation],
                       series_description_regex=r"(?i)\bap\b", min_age_days=2)
    dx = facts(sop_class_uids=frozenset({DigitalXRayImageStorageForPresentation}), series_description="Chest AP",
               age_days=5)
    assert decide([rule], dx).matched
    assert decide([rule], facts(series_description="Chest AP")).reason == \
        "SOP class 1.2.840.10008.5.1.4.1.1.1 for rule dx-ap"
    assert decide([rule], replace(dx, series_description="PA")).reason == \
        r"series description does not match /(?i)\bap\b/ for rule dx-ap"
    assert decide([rule], replace(dx, age_days=1)).reason == "patient age below 2 days for rule dx-ap"


def test_two_rules_give_each_pipeline_once() -> None:
    rules = [*DEFAULT_RULES, RoutingRule(name="all-chest", pipelines=["view", "cxr"], body_parts=["CHEST"])]
    assert decide(rules, facts()).pipelines == ("cxr", "view")


def test_results_are_never_routed() -> None:
    assert decide(DEFAULT_RULES, facts(is_result=True)).reason == "result series made by this node: not routed"


def test_single_image_modalities_complete_on_arrival() -> None:
    assert complete_on_arrival(header_of(make_image(modality="CR")))
    assert complete_on_arrival(header_of(make_image(modality="OT", sop_class_uid=DigitalXRayImageStorageForPresentation)))
    assert not complete_on_arrival(header_of(make_mr_slice()))


# --- on the index ------------------------------------------------------------------------------



@pytest.fixture
def completion(sessions: sessionmaker[Session], enqueued: Enqueued) -> Completion:
    return Completion(sessions, DEFAULT_RULES, quiet_seconds=30, enqueue=enqueued)


def receive(ingest: Ingest, completion: Completion, ds, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """What the C-STORE handler does: store, then completion."""
    result = ingest.store(file_bytes(ds), header_of(ds), transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, **kwargs)
    return result, completion.after_store(result, header_of(ds))


def jobs_of(sessions: sessionmaker[Session], series_pk: int) -> list[tuple[str, str, int]]:
    with sessions() as session:
        return [(j.pipeline, j.state.value, j.generation) for j in
                session.scalars(select(Job).where(Job.series_pk == series_pk).order_by(Job.pipeline))]


def series_row(sessions: sessionmaker[Session], series_pk: int) -> Series:
    with sessions() as session:
        return session.get(Series, series_pk)


def test_radiograph_completes_on_arrival_and_gets_a_job(ingest: Ingest, completion: Completion,
                                                        enqueued: Enqueued) -> None:
    result, done = receive(ingest, completion, make_image())
    assert done is not None and done.decision.pipelines == ("cxr",)
    assert jobs_of(ingest.sessions, result.series_pk) == [("cxr", "queued", 1)]
    assert enqueued == list(done.job_ids) and len(enqueued) == 1
    row = series_row(ingest.sessions, result.series_pk)
    assert (row.state, row.completions, row.routing_reason) == (
        SeriesState.complete, 1, "matched pediatric-radiograph: cxr")


def test_mr_completes_on_its_expected_count(ingest: Ingest, completion: Completion, enqueued: Enqueued) -> None:
    study, series = generate_uid(), generate_uid()
    slices = [make_mr_slice(study_uid=study, series_uid=series, instance_number=i, images_in_acquisition=3)
              for i in (1, 2, 3)]
    assert [receive(ingest, completion, ds)[1] for ds in slices[:2]] == [None, None]
    result, done = receive(ingest, completion, slices[2])
    assert done is not None and jobs_of(ingest.sessions, result.series_pk) == [("lung-mri", "queued", 1)]
    assert len(enqueued) == 1


def test_mr_without_count_completes_after_the_quiet_period(ingest: Ingest, completion: Completion) -> None:
    result, done = receive(ingest, completion, make_mr_slice())
    assert done is None
    last = series_row(ingest.sessions, result.series_pk).last_received_at
    assert completion.complete_quiet(now=last + dt.timedelta(seconds=29)) == []
    completed = completion.complete_quiet(now=last + dt.timedelta(seconds=31))
    assert [c.series_pk for c in completed] == [result.series_pk]
    assert jobs_of(ingest.sessions, result.series_pk) == [("lung-mri", "queued", 1)]
    assert completion.complete_quiet(now=last + dt.timedelta(seconds=60)) == []  # once


def test_late_instance_reopens_and_supersedes(ingest: Ingest, completion: Completion, enqueued: Enqueued) -> None:
    first = make_image()
    result, done = receive(ingest, completion, first)
    with transaction(ingest.sessions) as session:
        job = session.scalar(select(Job))
        job.state, job.attempts, job.finished_at = JobState.done, 1, utcnow()
    late = make_image(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID, instance_number=2)
    late_result, again = receive(ingest, completion, late)
    assert late_result.reopened and again is not None and again.recompleted
    assert jobs_of(ingest.sessions, result.series_pk) == [("cxr", "queued", 2)]
    assert enqueued == [done.job_ids[0], done.job_ids[0]]
    assert series_row(ingest.sessions, result.series_pk).completions == 2


def test_running_job_keeps_its_lease_when_superseded(ingest: Ingest, completion: Completion,
                                                     enqueued: Enqueued) -> None:
    first = make_image()
    result, _ = receive(ingest, completion, first)
    with transaction(ingest.sessions) as session:
        job = session.scalar(select(Job))
        job.state, job.lease_owner = JobState.running, "worker@host:1"
    receive(ingest, completion, make_image(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID))
    with ingest.sessions() as session:
        job = session.scalar(select(Job))
        assert (job.state, job.generation, job.lease_owner) == (JobState.running, 2, "worker@host:1")
    assert len(enqueued) == 1  # its worker re-queues it when it finishes


def test_adult_is_archived_with_the_reason(ingest: Ingest, completion: Completion, enqueued: Enqueued) -> None:
    result, done = receive(ingest, completion, make_image(birth_date="19800101", study_date="20250101"))
    assert done is not None and not done.decision.matched
    assert jobs_of(ingest.sessions, result.series_pk) == [] and enqueued == []
    assert series_row(ingest.sessions, result.series_pk).routing_reason == \
        "patient age above 6570 days for rule pediatric-radiograph"


def test_age_string_when_birth_date_is_missing(ingest: Ingest, completion: Completion) -> None:
    result, done = receive(ingest, completion, make_image(birth_date="", patient_age="002W"))
    assert done.decision.matched and jobs_of(ingest.sessions, result.series_pk) == [("cxr", "queued", 1)]


def test_series_matching_two_rules_gets_two_jobs(sessions: sessionmaker[Session], ingest: Ingest,
                                                 enqueued: Enqueued) -> None:
    rules = [*DEFAULT_RULES, RoutingRule(name="view-classifier", pipelines=["view"], modalities=["CR", "DX"])]
    completion = Completion(sessions, rules, quiet_seconds=30, enqueue=enqueued)
    result, done = receive(ingest, completion, make_image())
    assert jobs_of(sessions, result.series_pk) == [("cxr", "queued", 1), ("view", "queued", 1)]
    assert sorted(enqueued) == sorted(done.job_ids) and len(set(enqueued)) == 2


def test_results_made_here_are_not_routed(ingest: Ingest, completion: Completion, enqueued: Enqueued) -> None:
    result, done = receive(ingest, completion, make_image(), is_result=True)
    assert jobs_of(ingest.sessions, result.series_pk) == [] and enqueued == []
    assert series_row(ingest.sessions, result.series_pk).routing_reason.startswith("result series made by this node")


def test_job_creation_is_idempotent_under_concurrency(ingest: Ingest, sessions: sessionmaker[Session]) -> None:
    result = ingest.store(file_bytes(ds := make_image()), header_of(ds), transfer_syntax_uid="1.2.840.10008.1.2.1")
    ids: list[list[int]] = []

    def create() -> None:
        with transaction(sessions) as session:
            ids.append(create_jobs(session, result.series_pk, ["cxr", "view"]))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6 and len({tuple(i) for i in ids}) == 1
    assert jobs_of(sessions, result.series_pk) == [("cxr", "queued", 1), ("view", "queued", 1)]


def test_concurrent_completion_routes_once(ingest: Ingest, completion: Completion, enqueued: Enqueued) -> None:
    result, _ = receive(ingest, completion, make_mr_slice())
    outcomes: list[object] = []
    threads = [threading.Thread(target=lambda: outcomes.append(completion.complete(result.series_pk)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(o is not None for o in outcomes) == 1 and len(enqueued) == 1
    assert jobs_of(ingest.sessions, result.series_pk) == [("lung-mri", "queued", 1)]


def test_monitor_completes_quiet_series_and_stops(sessions: sessionmaker[Session], ingest: Ingest,
                                                  enqueued: Enqueued) -> None:
    completion = Completion(sessions, DEFAULT_RULES, quiet_seconds=0.3, enqueue=enqueued)
    result, _ = receive(ingest, completion, make_mr_slice())
    monitor = CompletionMonitor(completion, poll_seconds=0.05)
    monitor.start()
    try:
        deadline = time.monotonic() + 10
        while not enqueued and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        monitor.stop()
    assert not monitor.running
    assert series_row(sessions, result.series_pk).state == SeriesState.complete and len(enqueued) == 1


def test_enqueue_failure_leaves_the_job_queued(sessions: sessionmaker[Session], ingest: Ingest) -> None:
    def broken(job_id: int) -> None:
        raise ConnectionError("broker down")

    completion = Completion(sessions, DEFAULT_RULES, quiet_seconds=30, enqueue=broken)
    result, done = receive(ingest, completion, make_image())
    assert done is not None and jobs_of(sessions, result.series_pk) == [("cxr", "queued", 1)]
