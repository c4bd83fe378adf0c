"""Query/retrieve from a PACS: bring a cohort of studies into the archive (``cradle retrieve``).

For each requested row (a StudyInstanceUID, an AccessionNumber, or a PatientID with an optional
study date) a C-FIND at the STUDY level of the Study Root model (``sources[].ae_title``) finds the
studies and the number of instances the source holds of each. Then each study is retrieved:

- ``move`` (default): C-MOVE with the node's own AE title as destination. The source connects to the
  listener (which must run: ``cradle listen``/``serve``) and the instances are stored and indexed by
  the normal C-STORE path, with the same statuses and durability as a live push.
- ``get``: C-GET; the sub-operations' C-STOREs arrive on the same association and this process
  stores them through the listener's own handler (:func:`node.handlers.handle_store`, hence
  ``storage.ingest.Ingest``).

A study the index already holds with at least as many instances as the source reports is skipped
(resumable); a study is ``retrieved`` only when the index holds that many afterwards. Before asking,
a :class:`storage.models.Retrieval` row is committed for the study: completion reads it and routes
no series that arrives by it (no job, nothing sent) unless ``run_pipelines``. After a successful
retrieval the study's series still receiving are completed (everything the source has is here).

At most ``max_concurrent`` studies are retrieved at once (one association each); with a ``window``
(``HH:MM-HH:MM`` local time) a study starts only inside it and the run waits otherwise.

Logs carry UIDs, row positions (``line 4``) and row ids only: never an accession number or a patient ID.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydicom import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove, Verification,
)
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.logs import protect_logs
from config.settings import Settings, Source
from node import handlers
from node.cohort import FoundStudy, RetrieveKey, RetrieveSummary, RowOutcome, StudyOutcome, Window
from node.completion import Completion
from node.sender import client_tls
from node.tls import harden
from storage.archive import Archive
from storage.audit import audit
from storage.db import transaction
from storage.ingest import Ingest
from storage.models import Instance, Retrieval, RetrievalState, Series, SeriesState, Study, utcnow

log = logging.getLogger(__name__)


MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: context ids 1-255, odd)

# C-MOVE / C-GET statuses (PS3.4 C.4.2.1.5, C.4.3.1.4)
_STATUS_TEXT = {
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
    0xB000: "sub-operations complete, one or more failures or warnings",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
}


class SourceError(Exception):
    """The source could not be asked (no association, refused, no answer): the reason says which."""


class ListenerNotRunning(Exception):
    """C-MOVE needs the node's own listener to receive the instances, and it does not answer."""


# --- talking to the source --------------------------------------------------------------------

def _status_text(code: int) -> str:
    if code in _STATUS_TEXT:
        return _STATUS_TEXT[code]
    if 0xC000 <= code <= 0xCFFF:
        return "unable to process"
    return "failure"


def _rejection_text(assoc) -> str:  # noqa: ANN001 - pynetdicom Association
    primitive = getattr(assoc.acceptor, "primitive", None)
    try:
        return f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
    except Exception:  # noqa: BLE001 - whatever the primitive lacks
        return "rejected"


class SourceClient:
    """Associations with one source, as the node's AE title; thread-safe (one association per call)."""

    def __init__(self, source: Source, settings: Settings) -> None:
        self.source = source
        self.node = settings.node

    def _ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.acse_timeout = self.node.acse_timeout
        ae.dimse_timeout = self.source.timeout
        ae.network_timeout = self.source.timeout
        ae.maximum_pdu_size = self.node.max_pdu_size
        return ae

    def _associate(self, ae: AE, what: str, **kwargs: Any):  # noqa: ANN202 - pynetdicom Association
        source = self.source
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title,
                             tls_args=client_tls(source, self.node), **kwargs)
        if assoc.is_established:
            return assoc
        where = f"{source.ae_title} at {source.host}:{source.port}"
        if assoc.is_rejected:
            raise SourceError(f"{what}: association rejected by {where} ({_rejection_text(assoc)}); the source "
                              f"must know this node's AE title {self.node.ae_title}")
        raise SourceError(f"{what}: no association with {where} (connection refused, aborted, timed out"
                          f"{' or TLS handshake failed' if source.tls.enabled else ''})")

    def find(self, keys: Sequence[RetrieveKey],
             answered: Callable[[RetrieveKey, list[FoundStudy] | None, str], None]) -> None:
        """One association for all the queries; ``answered(key, studies or None, reason)`` per key."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, "C-FIND")
        try:
            for key in keys:
                try:
                    studies = self._find_one(assoc, key)
                except SourceError as exc:
                    answered(key, None, str(exc))
                    if not assoc.is_established:
                        assoc = self._associate(ae, "C-FIND")
                    continue
                answered(key, studies, "")
        finally:
            if assoc.is_established:
                assoc.release()

    def _find_one(self, assoc, key: RetrieveKey) -> list[FoundStudy]:  # noqa: ANN001
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = key.key if key.key_column == "StudyInstanceUID" else ""
        query.AccessionNumber = key.key if key.key_column == "AccessionNumber" else ""
        query.PatientID = key.key if key.key_column == "PatientID" else ""
        query.StudyDate = key.study_date if key.key_column == "PatientID" else ""
        query.NumberOfStudyRelatedInstances = ""
        query.SOPClassesInStudy = ""
        found: dict[str, FoundStudy] = {}
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise SourceError("C-FIND: no answer from the source (timed out or aborted)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is None or not str(identifier.get("StudyInstanceUID", "")).strip():
                    continue
                uid = str(identifier.StudyInstanceUID).strip()
                count = identifier.get("NumberOfStudyRelatedInstances")
                classes = identifier.get("SOPClassesInStudy") or []
                classes = [classes] if isinstance(classes, str) else list(classes)
                found[uid] = FoundStudy(uid, int(count) if count not in (None, "") else None,
                                        tuple(str(c) for c in classes if str(c).strip()))
            elif code != 0x0000:
                raise SourceError(f"C-FIND refused by the source: 0x{code:04X} ({_status_text(code)})")
        if key.key_column == "StudyInstanceUID":  # a source answering with other studies is not trusted
            return [study for uid, study in found.items() if uid == key.key]
        return list(found.values())

    def move(self, study_uid: str) -> tuple[int, int, str]:
        """C-MOVE the study to the node: (completed, failed sub-operations, reason; "" when it succeeded)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae, "C-MOVE")
        try:
            completed, failed, reason = self._retrieve_responses(
                assoc.send_c_move(_study_identifier(study_uid), self.node.ae_title,
                                  StudyRootQueryRetrieveInformationModelMove), "C-MOVE")
            if reason and completed == 0 and ("0xA801" in reason or "0xC" in reason):
                reason += (f"; the source must know this node's AE title {self.node.ae_title} as a move "
                           f"destination (a modality with this node's host and port {self.node.port})"
                           + ("" if "0xA801" in reason else "; the source's log says why"))
            elif failed and completed == 0:
                reason = reason or "C-MOVE: every sub-operation failed"
                reason += (f"; the source could not store to the listener at port {self.node.port}: does "
                           "node.allowed_calling_aets admit the source's AE title?")
            return completed, failed, reason
        finally:
            if assoc.is_established:
                assoc.release()

    def get(self, study: FoundStudy, store_handler: Callable, handler_args: list) -> tuple[int, int, str]:
        """C-GET the study; its C-STOREs go to ``store_handler`` on this association."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        classes = list(dict.fromkeys(study.sop_classes)) or [str(cx.abstract_syntax)
                                                             for cx in StoragePresentationContexts]
        classes = classes[:MAX_CONTEXTS - 1]
        syntaxes = [str(ts) for ts in AllTransferSyntaxes]
        for uid in classes:
            ae.add_requested_context(uid, syntaxes)
        roles = [build_role(uid, scp_role=True) for uid in classes]
        assoc = self._associate(ae, "C-GET", ext_neg=roles,
                                evt_handlers=[(evt.EVT_C_STORE, store_handler, handler_args)])
        try:
            return self._retrieve_responses(
                assoc.send_c_get(_study_identifier(study.study_uid), StudyRootQueryRetrieveInformationModelGet),
                "C-GET")
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _retrieve_responses(responses: Iterable, what: str) -> tuple[int, int, str]:
        completed = failed = 0
        final: int | None = None
        for status, _identifier in responses:
            if not status:
                return completed, failed, f"{what}: no answer from the source (timed out or aborted)"
            code = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or failed)
            if code not in (0xFF00,):
                final = code
        if final is None:
            return completed, failed, f"{what}: the source ended without a final status"
        if final == 0x0000:
            return completed, failed, ""
        if 0xB000 <= final <= 0xBFFF:
            return completed, failed, f"{what} ended with warning 0x{final:04X} ({_status_text(final)})"
        return completed, failed, f"{what} refused by the source: 0x{final:04X} ({_status_text(final)})"

    def echo_listener(self) -> None:
        """Is the node's listener up (C-MOVE delivers to it)? A C-ECHO under the node's own AE title;
        a rejection answers too (the listener then audits it: list ``node.ae_title`` bound to the
        loopback address in ``node.allowed_calling_aets`` to keep the check out of the rejections). A
        bare TCP probe would hold one of the listener's pending places until its association deadline."""
        node = self.node
        host = "127.0.0.1" if node.host in ("0.0.0.0", "") else "::1" if node.host == "::" else node.host
        ae = self._ae()
        ae.acse_timeout = min(ae.acse_timeout, 10)
        ae.add_requested_context(Verification)
        tls_args = None
        if node.tls.enabled:  # the node's own certificate, its name not checked (we called ourselves)
            context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.load_cert_chain(str(node.tls.certificate), str(node.tls.private_key))
            tls_args = (context, None)
        assoc = ae.associate(host, node.port, ae_title=node.ae_title, tls_args=tls_args)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        if assoc.is_rejected:
            return
        if node.tls.enabled and _port_open(host, node.port):
            log.warning("the listener's port %d is open but the TLS C-ECHO check failed: retrieving anyway",
                        node.port)
            return
        raise ListenerNotRunning(f"the node's listener does not answer at {self.node.host}:{self.node.port}: "
                                 "C-MOVE delivers the studies to it; start `cradle listen` (or `cradle serve`), "
                                 "or use retrieve: get")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def _study_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


# --- C-GET: the source's C-STOREs on our association ------------------------------------------

class _SourceAsSender:
    """The association as the C-STORE handler sees it: on a C-GET the source sends, so its AE title
    and address (not ours) are recorded as the instance's calling AE title and in the audit trail."""

    def __init__(self, assoc) -> None:  # noqa: ANN001 - pynetdicom Association
        self._assoc = assoc

    @property
    def requestor(self):  # noqa: ANN201
        return self._assoc.acceptor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._assoc, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_assoc":
            object.__setattr__(self, name, value)
        else:
            setattr(self._assoc, name, value)


class _StoreFromSource:
    def __init__(self, event) -> None:  # noqa: ANN001 - pynetdicom Event
        self._event = event
        self.assoc = _SourceAsSender(event.assoc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._event, name)


def handle_get_store(event, ingest: Ingest, after_store, limits) -> Any:  # noqa: ANN001
    """EVT_C_STORE of a C-GET: the listener's own handler (same checks, statuses, durability)."""
    return handlers.handle_store(_StoreFromSource(event), ingest, after_store, None, limits)


# --- the run ----------------------------------------------------------------------------------

Progress = Callable[[str, int | None], Any]
"""``progress("total", n)`` once the studies are known, then ``progress(status, None)`` per study."""


class Retriever:
    """``cradle retrieve``: query every key, then retrieve the studies not yet archived."""

    def __init__(self, settings: Settings, source: Source, sessions: sessionmaker[Session], *,
                 run_pipelines: bool = False, max_concurrent: int | None = None, window: Window | None = None,
                 progress: Progress | None = None, clock: Callable[[], dt.datetime] = dt.datetime.now,
                 sleep: Callable[[float], Any] = time.sleep, enqueue: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.source = source
        self.sessions = sessions
        self.run_pipelines = run_pipelines
        self.max_concurrent = max_concurrent or source.max_concurrent
        self.window = window if window is not None else (Window.parse(source.window) if source.window else None)
        self.progress = progress or (lambda _what, _n: None)
        self.clock, self.sleep = clock, sleep
        self.client = SourceClient(source, settings)
        self.completion = Completion(sessions, settings.routing.rules,
                                     quiet_seconds=settings.completion.quiet_seconds, enqueue=enqueue)
        self.stopping = threading.Event()
        self._ingest: Ingest | None = None

    # the whole run

    def run(self, keys: Sequence[RetrieveKey]) -> RetrieveSummary:
        started = time.monotonic()
        protect_logs()
        rows = [RowOutcome(key) for key in keys]
        by_key = {id(row.key): row for row in rows}
        if self.source.retrieve == "move":
            self.client.echo_listener()
        log.info("retrieve from %s (%s): %d row(s)", self.source.name, self.source.retrieve, len(rows))

        def answered(key: RetrieveKey, studies: list[FoundStudy] | None, reason: str) -> None:
            row = by_key[id(key)]
            if studies is None:
                row.status, row.reason = "failed", reason
            elif not studies:
                row.status, row.reason = "missing", f"no study at {self.source.name} matches this {key.key_column}"
            elif key.key_column == "AccessionNumber" and len(studies) > 1:
                row.status = "failed"
                row.reason = (f"this AccessionNumber matches {len(studies)} studies at {self.source.name}; "
                              "use StudyInstanceUID")
            else:
                row.studies = [StudyOutcome(s.study_uid, "pending", s.instances, 0) for s in studies]
                row.found = studies

        try:
            self.client.find(keys, answered)
        except SourceError as exc:
            for row in rows:
                if row.status == "pending":
                    row.status, row.reason = "failed", str(exc)
            log.error("retrieve from %s: %s", self.source.name, exc)
            return RetrieveSummary(self.source.name, self.source.retrieve, rows, time.monotonic() - started)

        # one retrieval per distinct study (two rows may name the same one)
        work: dict[str, FoundStudy] = {}
        for row in rows:
            for study in row.found:
                work.setdefault(study.study_uid, study)
        self.progress("total", len(work))
        outcomes: dict[str, StudyOutcome] = {}
        with ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="cradle-retrieve") as pool:
            futures = {uid: pool.submit(self._retrieve_study, study) for uid, study in work.items()}
            try:
                for uid, future in futures.items():
                    outcomes[uid] = future.result()
            except KeyboardInterrupt:
                log.warning("interrupted: the studies being retrieved finish, the others are not started")
                self.stopping.set()
                for uid, future in futures.items():
                    outcomes[uid] = future.result()
        for row in rows:
            if row.studies:
                row.studies = [outcomes[s.study_uid] for s in row.studies]
            row.settle()
            if row.status in ("missing", "failed"):
                log.warning("retrieve %s: %s: %s", self.source.name, row.key.where, row.status)
        return RetrieveSummary(self.source.name, self.source.retrieve, rows, time.monotonic() - started)

    # one study

    def _retrieve_study(self, study: FoundStudy) -> StudyOutcome:
        started = time.monotonic()
        before = self.archived_instances(study.study_uid)
        outcome = StudyOutcome(study.study_uid, "pending", study.instances, before)
        try:
            if study.instances is not None and before >= study.instances:
                outcome.status = "already_archived"
                return outcome
            self._wait_for_window()
            if self.stopping.is_set():
                outcome.status, outcome.reason = "failed", "interrupted before it started"
                return outcome
            outcome.retrieval_id = self._begin(study)
            try:
                if self.source.retrieve == "move":
                    completed, failed, reason = self.client.move(study.study_uid)
                else:
                    completed, failed, reason = self.client.get(
                        study, handle_get_store,
                        [self._get_ingest(), self.completion.after_store,
                         handlers.StoreLimits.of(self.settings.node)])
            except SourceError as exc:
                completed, failed, reason = 0, 0, str(exc)
            outcome.archived = self.archived_instances(study.study_uid)
            outcome.received = max(0, outcome.archived - before)
            outcome.status, outcome.reason = self._judge(study, outcome, completed, failed, reason)
            if outcome.status == "retrieved":
                self._complete_series(study.study_uid)
            self._finish(outcome)
        except Exception as exc:  # noqa: BLE001 - one study's trouble must not stop the others
            log.exception("retrieve of study %s failed: %s", study.study_uid, type(exc).__name__)
            outcome.status, outcome.reason = "failed", f"unexpected {type(exc).__name__}"
            if outcome.retrieval_id is not None:
                self._finish(outcome)
        finally:
            outcome.seconds = time.monotonic() - started
            self.progress(outcome.status, None)
        log.info("study %s: %s (%s of %s instances archived, %d new; retrieval %s) in %.1f s", study.study_uid,
                 outcome.status, outcome.archived, study.instances if study.instances is not None else "?",
                 outcome.received, outcome.retrieval_id, outcome.seconds)
        return outcome

    @staticmethod
    def _judge(study: FoundStudy, outcome: StudyOutcome, completed: int, failed: int,
               reason: str) -> tuple[str, str]:
        expected = study.instances
        complete = outcome.archived >= expected if expected is not None else (not reason and failed == 0)
        if complete and not reason:
            return "retrieved", ""
        if complete:  # e.g. a warning status but everything is here
            return "retrieved", ""
        if reason:
            return "failed", reason
        return "failed", (f"{outcome.archived} of {expected} instances archived "
                          f"({completed} sent, {failed} failed sub-operations)")

    def _wait_for_window(self) -> None:
        if self.window is None:
            return
        while not self.stopping.is_set():
            wait = self.window.seconds_until_open(self.clock())
            if wait <= 0:
                return
            log.info("outside the retrieve window %s: waiting %.0f s", self.window, wait)
            self.sleep(min(wait, 60.0))

    def _get_ingest(self) -> Ingest:
        if self._ingest is None:
            archive = Archive(self.settings.storage.archive_dir, fsync=self.settings.storage.fsync)
            archive.ensure_root()
            self._ingest = Ingest(archive, self.sessions, duplicate_policy=self.settings.node.duplicate_policy)
        return self._ingest

    # the index

    def archived_instances(self, study_uid: str) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id)).join(Series, Instance.series_pk == Series.id)
                                  .join(Study, Series.study_pk == Study.id)
                                  .where(Study.study_uid == study_uid)) or 0

    def _begin(self, study: FoundStudy) -> int:
        with transaction(self.sessions) as session:
            row = Retrieval(study_uid=study.study_uid, source=self.source.name, method=self.source.retrieve,
                            run_pipelines=self.run_pipelines, state=RetrievalState.retrieving,
                            expected_instances=study.instances, reason="", requested_at=utcnow())
            session.add(row)
            session.flush()
            retrieval_id = row.id
        audit("retrieval.requested", study_uid=study.study_uid, destination=self.source.name, state="retrieving",
              action=self.source.retrieve + ("+pipelines" if self.run_pipelines else ""))
        return retrieval_id

    def _finish(self, outcome: StudyOutcome) -> None:
        state = RetrievalState.retrieved if outcome.status == "retrieved" else RetrievalState.failed
        with transaction(self.sessions) as session:
            session.execute(update(Retrieval).where(Retrieval.id == outcome.retrieval_id).values(
                state=state, archived_instances=outcome.archived, reason=outcome.reason[:2000],
                finished_at=utcnow()))
        audit("retrieval.finished", study_uid=outcome.study_uid, action=self.source.retrieve,
              destination=self.source.name, state=state.value, stored=outcome.received, reason=outcome.reason[:200])

    def _complete_series(self, study_uid: str) -> None:
        """The source sent all it has: the study's series still receiving are complete (routed as
        history unless run_pipelines), without waiting for the quiet period."""
        with self.sessions() as session:
            receiving = list(session.scalars(select(Series.id).join(Study, Series.study_pk == Study.id).where(
                Study.study_uid == study_uid, Series.state == SeriesState.receiving)))
        for series_pk in receiving:
            self.completion.complete(series_pk)

