"""The worker's side of the job queue: ``cradle.run_job`` runs one job by id.

``register(app, settings)`` adds the task to an app built by :func:`node.queue.make_celery`; the
task's collaborators (index sessions, archive, pipelines, model cache) are opened lazily in the
process that runs it, once per process (again after a fork). The ``Job`` row is the truth
(:mod:`storage.jobs`): a job that is not queued, or whose lease went stale, is left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.logs import describe_exception, log_context
from config.settings import Settings
from node.queue import RUN_JOB, publish
from node.routing import start_shadow_jobs
from storage import jobs
from storage.archive import Archive, safe_component
from storage.db import configured_engine, session_factory, transaction
from storage.ingest import Ingest
from storage.models import Instance, Job, JobState, Series

log = logging.getLogger(__name__)

RETRY_DELAY_MAX_SECONDS = 60
SHADOW_YIELD_SECONDS = 2.0
"""A shadow job that finds clinical jobs waiting goes back on the queue for this long (see ``yields``)."""


def register(app: Celery, settings: Settings) -> "JobRunner":
    """Add ``cradle.run_job`` to ``app``; returns its runner (the worker warms it up)."""
    runner = JobRunner(settings, requeue=lambda job_id, delay: publish(app, job_id, delay))

    @app.task(name=RUN_JOB, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
    def run_job(job_id: int) -> str:
        return runner.run(int(job_id)).value

    return runner


@dataclass
class _ProcessResources:
    pid: int
    sessions: sessionmaker[Session]
    archive: Archive
    ingest: Ingest
    pipelines: Any = None  # PipelineHost, opened on the first job (imports torch)


class JobRunner:
    """Runs one job by id: lease, load the series, run its pipeline, archive the results, record
    the outcome. Idempotent: a job that is not queued (or stale) is left alone."""

    def __init__(self, settings: Settings, requeue: Callable[[int, float | None], None],
                 pipeline_host: Callable[[Settings], Any] | None = None) -> None:
        self.settings = settings
        self.requeue = requeue
        self.pipeline_host = pipeline_host or _default_pipeline_host
        self._resources: _ProcessResources | None = None

    def resources(self) -> _ProcessResources:
        """This process's collaborators; re-opened in a forked child (never share a DB pool)."""
        if self._resources is None or self._resources.pid != os.getpid():
            engine = configured_engine(self.settings.storage)
            sessions = session_factory(engine)
            archive = Archive(self.settings.storage.archive_dir, fsync=self.settings.storage.fsync)
            ingest = Ingest(archive, sessions, duplicate_policy="replace")  # a re-run replaces its result
            self._resources = _ProcessResources(os.getpid(), sessions, archive, ingest)
        return self._resources

    def warm_up(self) -> None:
        """Open this process's collaborators and the pipelines before the first job arrives, so
        the first study does not wait for torch to import. Failures are logged; the job that
        follows records them."""
        try:
            res = self.resources()
            if res.pipelines is None:
                res.pipelines = self.pipeline_host(self.settings)
            log.info("worker process %d ready: pipelines loaded", os.getpid())
        except Exception as exc:  # noqa: BLE001 - the first job will report it on its row
            log.warning("worker warm-up failed: %s", describe_exception(exc))

    def run(self, job_id: int) -> jobs.Finish:
        """Every line logged meanwhile carries the job's, series' and study's row ids."""
        with log_context(job_id=job_id):
            res = self.resources()
            if self.yields(res, job_id):
                return jobs.Finish.not_run
            lease = jobs.claim(res.sessions, job_id, jobs.process_identity(),
                               lease_for=jobs.lease_seconds(self.settings.queue),
                               max_attempts=self.settings.queue.max_attempts)
            if lease is None:
                return jobs.Finish.not_run
            with res.sessions() as session:
                study_pk = session.scalar(select(Series.study_pk).where(Series.id == lease.series_pk))
            with log_context(series_pk=lease.series_pk, study_pk=study_pk):
                log.info("job %d: %s%s on series %d, attempt %d", job_id, lease.pipeline,
                         f" (shadow run of {lease.shadow})" if lease.shadow else "", lease.series_pk, lease.attempts)
                if res.pipelines is None:
                    res.pipelines = self.pipeline_host(self.settings)
                return self._run_leased(res, lease)

    def yields(self, res: _ProcessResources, job_id: int) -> bool:
        """A shadow job never delays a clinical one: while any clinical job is queued, it is not taken
        but put back on the queue (``SHADOW_YIELD_SECONDS`` later), behind the clinical ones."""
        with res.sessions() as session:
            if not session.scalar(select(Job.shadow).where(Job.id == job_id)):
                return False
            waiting = session.scalar(select(func.count()).select_from(Job)
                                     .where(Job.state == JobState.queued, Job.shadow == ""))
        if not waiting:
            return False
        log.info("job %d: shadow run waits for %d queued clinical job(s)", job_id, waiting)
        self._requeue(job_id, SHADOW_YIELD_SECONDS)
        return True

    def _run_leased(self, res: _ProcessResources, lease: jobs.Lease) -> jobs.Finish:
        host = res.pipelines
        try:
            sources = load_sources(res.sessions, res.archive, lease.series_pk,
                                   limits=PixelLimits.of(self.settings))
            output = host.run(lease.pipeline, sources, shadow=lease.shadow)
            if not jobs.still_owned(res.sessions, lease):
                log.info("job %d: superseded or taken over while running; output discarded", lease.job_id)
                return self._after_complete(lease, jobs.release_superseded(res.sessions, lease))
            stored = [store_result(res.ingest, dataset) for dataset in output.datasets]
            kept = store_artefacts(res, lease, getattr(output, "artefacts", None) or {})
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job row
            if host.is_no_active_model(exc) or isinstance(exc, ShadowStopped):
                log.info("job %d: skipped: %s", lease.job_id, exc)
                return jobs.skip(res.sessions, lease, str(exc))
            # A shadow run is not retried: it must not take the clinical runs' worker time again.
            permanent = isinstance(exc, PERMANENT_INPUT_ERRORS) or host.is_permanent(exc) or bool(lease.shadow)
            return self._failed(res, lease, exc, permanent=permanent)
        result = result_summary(lease, output, stored, kept)
        finish = jobs.complete(res.sessions, lease, model_version=str(output.model_version),
                               result=result, has_output=bool(stored))
        log.info("job %d: %s (%d result instances, model %s)", lease.job_id, finish.value, len(stored),
                 output.model_version)
        if finish == jobs.Finish.done and not lease.shadow:
            self._start_shadows(res, lease)
        return self._after_complete(lease, finish)

    def _start_shadows(self, res: _ProcessResources, lease: jobs.Lease) -> None:
        """Queue the shadow runs of this clinical run (after it, so they never delay it). Nothing
        that goes wrong here touches the clinical job: it is done already."""
        try:
            versions = res.pipelines.shadow_versions(lease.pipeline)
            if not versions:
                return
            with transaction(res.sessions) as session:
                job_ids = start_shadow_jobs(session, lease.series_pk, lease.pipeline, versions)
        except Exception as exc:  # noqa: BLE001 - a shadow never fails the clinical job
            log.warning("job %d: shadow runs not started: %s", lease.job_id, describe_exception(exc))
            return
        log.info("job %d: shadow run(s) of %s queued as job(s) %s", lease.job_id, ", ".join(versions),
                 ", ".join(map(str, job_ids)) or "none (running already)")
        for job_id in job_ids:
            self._requeue(job_id, None)

    def _after_complete(self, lease: jobs.Lease, finish: jobs.Finish) -> jobs.Finish:
        if finish == jobs.Finish.requeued:
            self._requeue(lease.job_id, None)
        return finish

    def _requeue(self, job_id: int, delay: float | None) -> None:
        try:
            self.requeue(job_id, delay)
        except Exception as exc:  # noqa: BLE001 - the row is queued; the reconciler sends it later
            log.warning("job %d: re-enqueue failed (%s); left to the reconciler", job_id, type(exc).__name__)
            return
        jobs.mark_enqueued(self.resources().sessions, job_id)

    def _failed(self, res: _ProcessResources, lease: jobs.Lease, exc: BaseException, *,
                permanent: bool) -> jobs.Finish:
        error = (f"over the time limit of {self.settings.queue.task_time_limit} s"
                 if isinstance(exc, SoftTimeLimitExceeded) else describe_exception(exc))[:jobs.ERROR_LIMIT]
        log.warning("job %d: attempt %d failed: %s", lease.job_id, lease.attempts, error,
                    exc_info=log.isEnabledFor(logging.DEBUG))  # our formatters withhold library messages
        finish = jobs.fail_attempt(res.sessions, lease, error, max_attempts=self.settings.queue.max_attempts,
                                   permanent=permanent)
        if finish == jobs.Finish.requeued:
            self._requeue(lease.job_id, float(min(RETRY_DELAY_MAX_SECONDS, 2 ** lease.attempts)))
        return finish


class SeriesTooLarge(ValueError):
    """The series declares more pixels (or bits) than ``inference.max_pixels_*`` allow: refused before
    any pixel is decoded (a decoder allocates what the header declares). Permanent: the job fails
    once, with this reason, and the queue moves on."""


class UnreadableSource(ValueError):
    """An archived instance of the series cannot be read (its header, not its pixels). Permanent."""


PERMANENT_INPUT_ERRORS: tuple[type[BaseException], ...] = (SeriesTooLarge, UnreadableSource)
"""Failures of a job that a retry cannot fix (besides the pipelines' own, ``PipelineHost.is_permanent``)."""


@dataclass(frozen=True)
class PixelLimits:
    max_pixels_per_frame: int = 100_000_000
    max_pixels_per_series: int = 1_000_000_000
    max_bits_allocated: int = 32

    @classmethod
    def of(cls, settings: Settings) -> "PixelLimits":
        inference = settings.inference
        return cls(inference.max_pixels_per_frame, inference.max_pixels_per_series, inference.max_bits_allocated)


def declared_pixels(ds: Dataset, limits: PixelLimits) -> int:
    """Rows x Columns x Samples per Pixel x Number of Frames that ``ds`` declares (0 without pixel
    data), checked against ``limits`` (SeriesTooLarge); reads header values only."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return 0
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise UnreadableSource("image without valid Rows, Columns, Bits Allocated, Samples per Pixel "
                               "or Number of Frames") from None
    if min(rows, columns, samples, frames, bits) < 1:
        raise UnreadableSource("image declares a dimension below 1")
    if bits > limits.max_bits_allocated:
        raise SeriesTooLarge(f"Bits Allocated {bits} above inference.max_bits_allocated "
                             f"({limits.max_bits_allocated})")
    per_frame = rows * columns * samples
    if per_frame > limits.max_pixels_per_frame:
        raise SeriesTooLarge(f"a frame of {rows} x {columns} x {samples} is above inference.max_pixels_per_frame "
                             f"({limits.max_pixels_per_frame})")
    return per_frame * frames


def load_sources(sessions: sessionmaker[Session], archive: Archive, series_pk: int,
                 limits: PixelLimits | None = None) -> list[Dataset]:
    """The series' instances from the archive, sorted by instance number, then SOP Instance UID.

    Each file is read (its pixel data stays encoded) and what it declares is checked against
    ``limits`` before anything decodes a pixel: per frame, and for the whole series."""
    limits = limits or PixelLimits()
    with sessions() as session:
        rows = session.execute(select(Instance.file_path, Instance.instance_number, Instance.sop_uid)
                               .where(Instance.series_pk == series_pk)).all()
        if not rows and session.get(Series, series_pk) is None:
            raise LookupError(f"series {series_pk} is not in the index")
    rows = sorted(rows, key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_uid))
    if not rows:
        raise LookupError(f"series {series_pk} has no archived instances")
    sources, total = [], 0
    for row in rows:
        try:
            ds = dcmread(archive.absolute(row.file_path))
        except (InvalidDicomError, ValueError, EOFError) as exc:
            raise UnreadableSource(f"instance {row.sop_uid} cannot be read ({type(exc).__name__})") from None
        total += declared_pixels(ds, limits)
        if total > limits.max_pixels_per_series:
            raise SeriesTooLarge(f"the series declares more than inference.max_pixels_per_series "
                                 f"({limits.max_pixels_per_series}) pixels")
        sources.append(ds)
    return sources


def store_result(ingest: Ingest, dataset: Dataset) -> dict[str, str]:
    ingest.store_dataset(dataset, is_result=True)
    return {"sop_uid": str(dataset.SOPInstanceUID), "sop_class_uid": str(dataset.SOPClassUID),
            "series_uid": str(dataset.SeriesInstanceUID), "modality": str(dataset.get("Modality", ""))}


def store_artefacts(res: _ProcessResources, lease: jobs.Lease, artefacts: dict[str, Any]) -> list[str]:
    """Keep a run's artefacts (e.g. Grad-CAM heat maps) in the archive beside the source series:
    ``<study>/<series>/cradle-artefacts/<pipeline>/<name>``; a DICOM artefact is archived and
    indexed like a result (but not sent). Returns what was kept (paths or SOP Instance UIDs)."""
    if not artefacts:
        return []
    with res.sessions() as session:
        series = session.get(Series, lease.series_pk)
        folder = "/".join((safe_component(series.study.study_uid), safe_component(series.series_uid),
                           "cradle-artefacts", safe_component(lease.pipeline)))
    kept = []
    for name, value in artefacts.items():
        if isinstance(value, Dataset):
            kept.append(store_result(res.ingest, value)["sop_uid"])
        elif isinstance(value, (bytes, bytearray)):
            kept.append(res.archive.put(f"{folder}/{safe_component(str(name))}", bytes(value)).relative_path)
    return kept


def result_summary(lease: jobs.Lease, output: Any, stored: list[dict[str, str]],
                   archived: list[str]) -> dict[str, Any]:
    """The job's ``result`` column: what was made, no patient identifiers."""
    return {"generation": lease.generation, "pipeline": lease.pipeline,
            "model_version": str(output.model_version), "instances": stored, "artefacts": archived,
            "summary": _json_safe(getattr(output, "summary", None) or {})}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


class UnknownPipeline(LookupError):
    """The job names a pipeline this worker does not have."""


class ShadowStopped(LookupError):
    """A shadow job whose version is no longer in shadow (stopped or promoted meanwhile): skipped."""


class PipelineHost:
    """The pipelines and the model cache of one worker process (imports torch when built)."""

    def __init__(self, settings: Settings) -> None:
        from inference import pipelines

        self._pipelines = pipelines
        self.context = pipelines.PipelineContext.from_settings(settings)

    def run(self, pipeline: str, sources: list[Dataset], shadow: str = "") -> Any:
        """Run ``pipeline``, as a shadow run of model version ``shadow`` when given."""
        try:
            runnable = self._pipelines.get_pipeline(pipeline)
        except KeyError as exc:
            raise UnknownPipeline(str(exc).strip("'\"")) from None
        if not shadow:
            return runnable.run(sources, self.context)
        self.context.models.keep_shadows(self.shadow_versions())  # free the stopped ones
        if shadow not in self.shadow_versions(pipeline):
            raise ShadowStopped(f"{shadow} is no longer in shadow")
        return runnable.run(sources, self.context.for_shadow(shadow))

    def shadow_versions(self, pipeline: str | None = None) -> list[str]:
        """The model versions in shadow for the tasks of ``pipeline`` (of every pipeline when None),
        read from the registry."""
        catalogue, registry = self.context.catalogue, self.context.registry
        tasks = catalogue.of_pipeline(pipeline) if pipeline else list(catalogue)
        return [shadow["version"] for task in tasks for shadow in registry.shadows(task.name)]

    def is_no_active_model(self, exc: BaseException) -> bool:
        return isinstance(exc, self._pipelines.NoActiveModel)

    def is_permanent(self, exc: BaseException) -> bool:
        """Retrying does not help: the series does not suit the pipeline, or no such pipeline."""
        return isinstance(exc, (self._pipelines.PipelineInputError, UnknownPipeline))


def _default_pipeline_host(settings: Settings) -> PipelineHost:
    return PipelineHost(settings)
