"""Dispatch with real peers: DCMTK ``storescp`` and pynetdicom SCPs started by the tests.

Delivery and its Send records, a destination that is down and comes up, failure and warning
statuses, the last attempt parking the job as failed (visible in ``cradle jobs list --json``),
``cradle jobs retry`` re-sending the same UIDs, two destinations, and the worker and dispatcher
as real processes end to end.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import free_port, require  # noqa: E402
from fake_pipelines import FakeHost, make_cr, write_config  # noqa: E402
from test_queue import Node, WorkerProcess, make_node, make_settings, wait_for  # noqa: E402

from config.settings import Settings  # noqa: E402
from storage import jobs  # noqa: E402
from node.queue import JobQueue  # noqa: E402
from node import jobs_commands  # noqa: E402
from node.dispatch import Dispatcher, backoff  # noqa: E402
from node.sender import Outgoing, send  # noqa: E402
from storage.models import DispatchState, JobState, Send  # noqa: E402


# --------------------------------------------------------------------------- peers


class StoreSCP:
    """A pynetdicom storage SCP answering the statuses in ``statuses`` first, then ``default``."""

    def __init__(self, port: int, ae_title: str = "PACS", statuses: list[int] | None = None,
                 default: int = 0x0000, allowed_calling: list[str] | None = None) -> None:
        self.port, self.ae_title = port, ae_title
        self.statuses = deque(statuses or [])
        self.default = default
        self.allowed_calling = allowed_calling
        self.stored: list[str] = []
        self.answers: list[int] = []
        self.syntaxes: list[str] = []
        self.received: list[bytes] = []
        self._ae: AE | None = None
        self._server: Any = None

    def handle(self, event: Any) -> int:
        status = self.statuses.popleft() if self.statuses else self.default
        self.answers.append(status)
        self.syntaxes.append(str(event.context.transfer_syntax))
        self.received.append(event.encoded_dataset(include_meta=False))
        if status in (0x0000, 0xB000, 0xB007, 0xB006):
            self.stored.append(str(event.dataset.SOPInstanceUID))
        return status

    def start(self) -> "StoreSCP":
        self._ae = AE(ae_title=self.ae_title)
        self._ae.supported_contexts = AllStoragePresentationContexts
        if self.allowed_calling is not None:
            self._ae.require_calling_aet = self.allowed_calling
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self.handle)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


@pytest.fixture
def scps() -> Iterator[list[StoreSCP]]:
    started: list[StoreSCP] = []
    yield started
    for scp in started:
        scp.stop()


def wait_listening(port: int, timeout: float = 10) -> None:
    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0
    wait_for(accepting, timeout, f"a listener on port {port}")


def destination(name: str, port: int, ae_title: str = "PACS") -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port}


def dispatch_settings(tmp_path: Path, destinations: list[dict[str, Any]], **dispatch: Any) -> Settings:
    return make_settings(tmp_path, destinations=destinations,
                         dispatch={"max_attempts": 4, "backoff_seconds": 0.2, "backoff_max_seconds": 1.0,
                                   **dispatch},
                         node={"ae_title": "CRADLE", "acse_timeout": 5, "dimse_timeout": 5,
                               "network_timeout": 5})


def done_job(node: Node) -> tuple[int, str]:
    """A job run by the worker's JobRunner (fake pipeline): done, one SC result, dispatch pending."""
    series_pk, _ = node.add_series()
    job_id = node.add_job(series_pk)
    assert node.runner(FakeHost()).run(job_id) == jobs.Finish.done
    job = node.job(job_id)
    assert job.dispatch_state == DispatchState.pending
    return job_id, job.result["instances"][0]["sop_uid"]


def sends(node: Node, job_id: int) -> list[Send]:
    with node.sessions() as session:
        return list(session.scalars(select(Send).where(Send.job_pk == job_id).order_by(Send.id)))


def run_until(dispatcher: Dispatcher, node: Node, job_id: int, done: Any, timeout: float = 30) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.02), daemon=True)
    thread.start()
    try:
        wait_for(lambda: done(node.job(job_id)), timeout, "the dispatcher")
    finally:
        stop.set()
        thread.join(10)


def cli_json(function: Any, settings: Settings, capsys: pytest.CaptureFixture, **args: Any) -> Any:
    capsys.readouterr()
    assert function(argparse.Namespace(config=None, **args), settings) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- tests


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    settings = dispatch_settings(tmp_path, [], backoff_seconds=2, backoff_max_seconds=10).dispatch
    assert [backoff(settings, n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_delivered_to_dcmtk_storescp_and_recorded(tmp_path: Path) -> None:
    storescp = require("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    peer = subprocess.Popen([storescp, "-aet", "PACS", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
        job_id, sop_uid = done_job(node)
        assert Dispatcher(node.settings, node.sessions).run_once() == 1
    finally:
        peer.terminate()
        peer.wait(10)
    job = node.job(job_id)
    assert job.state == JobState.done and job.dispatch_state == DispatchState.sent
    assert job.dispatched_at is not None and job.error == ""
    [record] = sends(node, job_id)
    assert (record.destination, record.sop_uid, record.status, record.attempt, record.round) == \
        ("pacs", sop_uid, 0x0000, 1, 1)
    [file] = list(received.iterdir())
    assert dcmread(file).SOPInstanceUID == sop_uid
    assert Dispatcher(node.settings, node.sessions).run_once() == 0, "nothing is sent twice"


def test_destination_down_is_retried_with_backoff_and_delivered_once_it_is_up(
        tmp_path: Path, scps: list[StoreSCP]) -> None:
    port = free_port()
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)], max_attempts=8), tmp_path)
    job_id, sop_uid = done_job(node)
    dispatcher = Dispatcher(node.settings, node.sessions)
    run_until(dispatcher, node, job_id, lambda job: job.dispatch_attempts >= 3)
    failed = sends(node, job_id)
    assert [s.status for s in failed] == [None] * len(failed) and len(failed) >= 3
    assert failed[0].error == "no association (connection refused, aborted or timed out)"
    gaps = [(b.sent_at - a.sent_at).total_seconds() for a, b in zip(failed, failed[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, f"exponential backoff, got gaps {gaps}"
    job = node.job(job_id)
    assert job.state == JobState.done and job.dispatch_state == DispatchState.pending
    assert "pacs: 1 of 1 not delivered" in job.error
    scp = StoreSCP(port).start()
    scps.append(scp)
    run_until(dispatcher, node, job_id, lambda job: job.dispatch_state == DispatchState.sent)
    assert scp.stored == [sop_uid], "stored once at the destination"
    assert sends(node, job_id)[-1].status == 0x0000
    assert node.job(job_id).error == ""


@pytest.mark.parametrize("status", [0xA700, 0xC000])
def test_failure_status_is_retried(tmp_path: Path, scps: list[StoreSCP], status: int) -> None:
    port = free_port()
    scp = StoreSCP(port, statuses=[status, status]).start()
    scps.append(scp)
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    job_id, sop_uid = done_job(node)
    run_until(Dispatcher(node.settings, node.sessions), node, job_id,
              lambda job: job.dispatch_state == DispatchState.sent)
    assert [(s.status, s.attempt) for s in sends(node, job_id)] == [(status, 1), (status, 2), (0x0000, 3)]
    assert scp.stored == [sop_uid]


def test_warning_status_counts_as_delivered_and_is_recorded(tmp_path: Path, scps: list[StoreSCP]) -> None:
    port = free_port()
    scps.append(StoreSCP(port, statuses=[0xB000]).start())
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    job_id, _ = done_job(node)
    Dispatcher(node.settings, node.sessions).run_once()
    assert node.job(job_id).dispatch_state == DispatchState.sent
    assert [s.status for s in sends(node, job_id)] == [0xB000]


def test_results_go_out_in_their_archived_syntax_byte_for_byte(tmp_path: Path, scps: list[StoreSCP]) -> None:
    """The destination accepts both little-endian syntaxes; proposing the file's own in a context of
    its own lets it take that one, so nothing is decoded and re-encoded on the way out."""
    port = free_port()
    scps.append(StoreSCP(port).start())
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    job_id, sop_uid = done_job(node)
    Dispatcher(node.settings, node.sessions).run_once()
    assert node.job(job_id).dispatch_state == DispatchState.sent
    [result] = [i for i in node.result_instances() if i.sop_uid == sop_uid]
    path = node.ingest.archive.absolute(result.file_path)
    assert scps[0].syntaxes == [str(dcmread(path).file_meta.TransferSyntaxUID)] == [ExplicitVRLittleEndian]
    [body] = scps[0].received
    assert len(body) > 500 and path.read_bytes().endswith(body)  # the archived data set, as it is


def test_last_attempt_fails_the_job_visibly_and_retry_sends_the_same_uids(
        tmp_path: Path, scps: list[StoreSCP], capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    scp = StoreSCP(port, default=0xA700).start()
    scps.append(scp)
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)], max_attempts=3), tmp_path)
    job_id, sop_uid = done_job(node)
    dispatcher = Dispatcher(node.settings, node.sessions)
    run_until(dispatcher, node, job_id, lambda job: job.state == JobState.failed)
    assert scp.answers == [0xA700] * 3 and scp.stored == []
    listed = cli_json(jobs_commands.jobs_list, node.settings, capsys, state="failed", json=True)
    [row] = listed
    assert row["id"] == job_id and row["dispatch_state"] == "failed"
    assert row["error"] == "dispatch failed after 3 attempts: pacs: 1 of 1 not delivered (status 0xA700)"
    assert "Test^Baby" not in json.dumps(listed) and "CRADLE-QUEUE-1" not in json.dumps(listed)
    assert dispatcher.run_once() == 0, "a failed job stays parked"

    scp.default = 0x0000
    assert jobs_commands.jobs_retry(argparse.Namespace(config=None, job_id=job_id), node.settings) == 0
    assert node.job(job_id).state == JobState.done
    assert dispatcher.run_once() == 1
    assert scp.stored == [sop_uid], "the same SOP Instance UID"
    shown = cli_json(jobs_commands.jobs_show, node.settings, capsys, job_id=job_id)
    assert shown["state"] == "done" and shown["dispatch_state"] == "sent" and shown["error"] == ""
    assert [(s["status"], s["attempt"]) for s in shown["sends"]] == [("0xA700", 1), ("0xA700", 2),
                                                                     ("0xA700", 3), ("0x0000", 1)]
    assert {s["sop_uid"] for s in shown["sends"]} == {sop_uid}


def test_retry_of_a_delivered_job_sends_it_again_and_refuses_a_running_one(
        tmp_path: Path, scps: list[StoreSCP]) -> None:
    port = free_port()
    scp = StoreSCP(port).start()
    scps.append(scp)
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    job_id, sop_uid = done_job(node)
    dispatcher = Dispatcher(node.settings, node.sessions)
    dispatcher.run_once()
    assert jobs.retry(node.sessions, job_id) == jobs.RetryAction.resend
    dispatcher.run_once()
    assert scp.stored == [sop_uid, sop_uid]
    assert [s.round for s in sends(node, job_id)] == [1, 2]
    other = node.add_job(node.add_series()[0])
    with pytest.raises(jobs.RetryRefused, match="queued"):
        jobs.retry(node.sessions, other)


def test_two_destinations_only_the_failing_one_is_sent_again(tmp_path: Path, scps: list[StoreSCP]) -> None:
    good_port, flaky_port = free_port(), free_port()
    good = StoreSCP(good_port, "GOOD").start()
    flaky = StoreSCP(flaky_port, "FLAKY", statuses=[0xA700]).start()
    scps += [good, flaky]
    node = make_node(dispatch_settings(tmp_path, [destination("good", good_port, "GOOD"),
                                                  destination("flaky", flaky_port, "FLAKY")]), tmp_path)
    job_id, sop_uid = done_job(node)
    run_until(Dispatcher(node.settings, node.sessions), node, job_id,
              lambda job: job.dispatch_state == DispatchState.sent)
    assert good.stored == [sop_uid] and flaky.stored == [sop_uid]
    assert [(s.destination, s.status) for s in sends(node, job_id)] == [
        ("good", 0x0000), ("flaky", 0xA700), ("flaky", 0x0000)]


def test_rejected_association_and_missing_context_are_reported_per_instance(
        tmp_path: Path, scps: list[StoreSCP]) -> None:
    port = free_port()
    scps.append(StoreSCP(port, allowed_calling=["SOMEBODY"]).start())
    settings = dispatch_settings(tmp_path, [destination("pacs", port)])
    node = make_node(settings, tmp_path)
    source = make_cr()
    node.ingest.store_dataset(source, is_result=False)
    path = node.ingest.archive.absolute(f"{source.StudyInstanceUID}/{source.SeriesInstanceUID}/"
                                        f"{source.SOPInstanceUID}.dcm")
    item = Outgoing(source.SOPInstanceUID, source.SOPClassUID, str(source.file_meta.TransferSyntaxUID), path)
    [outcome] = send(settings.destinations[0], [item], settings.node)
    assert outcome.status is None and outcome.error == "association rejected" and not outcome.delivered


def test_a_skipped_job_sends_nothing(tmp_path: Path, scps: list[StoreSCP]) -> None:
    from fake_pipelines import NoModelPipeline

    port = free_port()
    scp = StoreSCP(port).start()
    scps.append(scp)
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    job_id = node.add_job(node.add_series()[0], "test-nomodel")
    node.runner(FakeHost(lambda p, s: NoModelPipeline().run(s, None))).run(job_id)
    assert Dispatcher(node.settings, node.sessions).run_once() == 0
    assert scp.answers == [] and sends(node, job_id) == []


def dispatcher_command(config: Path) -> list[str]:
    """``cradle dispatch --config CONFIG`` (called directly)."""
    code = (f"import logging, sys; from config.settings import load_settings; "
            f"from node import jobs_commands; logging.basicConfig(level='INFO'); "
            f"sys.exit(jobs_commands.dispatch(None, load_settings({str(config)!r})))")
    return [sys.executable, "-c", code]


def test_worker_and_dispatcher_processes_deliver_to_storescp(tmp_path: Path) -> None:
    """Job queued → worker process (embedded broker) → done → dispatcher process → storescp."""
    storescp = require("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    peer = subprocess.Popen([storescp, "-aet", "PACS", "-od", str(received), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = make_node(dispatch_settings(tmp_path, [destination("pacs", port)]), tmp_path)
    worker = WorkerProcess(node.settings, tmp_path).start()
    log = open(tmp_path / "dispatch.log", "wb")
    dispatcher = subprocess.Popen(dispatcher_command(write_config(node.settings, tmp_path / "d.yaml")),
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port)
        wait_for(lambda: "pipelines loaded" in worker.output(), 90, f"the worker\n{worker.output()[-2000:]}")
        job_id = node.add_job(node.add_series()[0])
        started = time.monotonic()
        queue = JobQueue(node.settings, node.sessions)
        queue.enqueue(job_id)
        wait_for(lambda: any(received.iterdir()), 30, "the result at the destination", interval=0.01)
        print(f"\nenqueue -> stored at the destination: {time.monotonic() - started:.2f} s")
        queue.close()
        wait_for(lambda: node.job(job_id).dispatch_state == DispatchState.sent, 10, "sent")
        dispatcher.send_signal(signal.SIGTERM)
        assert dispatcher.wait(15) == 0, "SIGTERM stops the dispatcher cleanly"
        assert worker.stop() == 0, "SIGTERM stops the worker cleanly"
    finally:
        for process in (dispatcher, peer):
            if process.poll() is None:
                process.kill()
                process.wait(10)
        worker.stop()
        log.close()
    [file] = list(received.iterdir())
    assert dcmread(file).SOPInstanceUID == node.job(job_id).result["instances"][0]["sop_uid"]
