"""The C-STORE response path (issue 16): the answer waits for the instance on disk and in the index,
and for nothing else. Completion, routing and the job publish run after it, on the listener's
completion queue; what that part loses (a full queue, a crash, a publish that never came back) is
made good by the completion monitor and the reconciler.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import yaml
from pydicom.uid import ExplicitVRLittleEndian

from config.settings import Settings
from deployment import wait_until
from node.server import Listener
from storage.db import open_index
from storage.models import Job, Series, SeriesState
from test_listener import (  # noqa: F401 - enqueued: the fixture
    Enqueued, association, cradle_listen, enqueued, job_rows, rows, storescu, write,
)
from test_storage import make_image, make_mr_slice


class BlockedBroker(Enqueued):
    """An enqueue that hangs until released, as a publish to a broker that stopped answering does."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def __call__(self, job_id: int) -> None:
        self.released.wait(30)
        super().__call__(job_id)


def test_store_is_answered_while_the_publish_is_blocked(node_settings: Settings) -> None:
    """Completion, routing and the publish run after the answer: with the broker hung, three
    radiographs are answered at once. The completion queue holds one (queue_capacity 1) while the
    first hangs in its publish; the third does not fit and is left to the monitor, which completes
    a radiograph's series still receiving 2 s after it arrived. Once the broker answers, each
    series' job arrives exactly once."""
    node_settings.completion.queue_capacity = 1
    broker = BlockedBroker()
    images = [make_image() for _ in range(3)]
    with Listener(node_settings, enqueue=broker) as listener, association(
            node_settings.node.port, (images[0].SOPClassUID, ExplicitVRLittleEndian)) as assoc:
        for ds in images:
            started = time.monotonic()
            assert assoc.send_c_store(ds).Status == 0x0000
            assert time.monotonic() - started < 1.0
            if ds is images[0]:
                wait_until(lambda: listener.completions.waiting == 0, 5, "the first completion to start")
        assert listener.completions.dropped == 1 and broker == []
        sample = listener.metrics.registry.get_sample_value
        assert sample("cradle_completion_queue_left_to_monitor") == 1
        assert sample("cradle_completion_queue_waiting") == 1  # the second, behind the hung first
        # routed while the publish hangs: the first by the queue's thread, one more by the monitor (which
        # then hangs in its publish too); the other waits in the queue or for the monitor
        wait_until(lambda: len(job_rows(node_settings)) == 2, 10, "two series routed")
        assert broker == []
        broker.released.set()
        wait_until(lambda: len(broker) == 3, 10, "the three jobs published")
    assert sorted(broker) == sorted(job_id for *_, job_id in job_rows(node_settings))
    assert {state for (state,) in rows(node_settings, Series.state)} == {SeriesState.complete}


def test_a_completion_lost_in_a_crash_is_made_at_the_next_start(node_settings: Settings, enqueued: Enqueued) -> None:
    """What a crash right after a C-STORE's answer leaves: instances committed, their series still
    ``receiving``, no job. The next listener's monitor completes and routes them: the radiograph 2 s
    after it arrived, the MR series after the quiet period (2 s here)."""
    from storage.archive import Archive
    from storage.ingest import Ingest
    from test_storage import store

    sessions = open_index(node_settings.storage.database_url)
    ingest = Ingest(Archive(node_settings.storage.archive_dir, fsync=False), sessions)
    ingest.archive.ensure_root()
    radiograph, mr = make_image(), make_mr_slice(images_in_acquisition=3)
    for ds in (radiograph, mr):
        assert store(ingest, ds).outcome.value == "stored"
    sessions.kw["bind"].dispose()
    assert job_rows(node_settings) == []
    with Listener(node_settings, enqueue=enqueued):
        wait_until(lambda: len(enqueued) == 2, 15, "both series routed after the restart")
    assert sorted((series, pipeline) for series, pipeline, *_ in job_rows(node_settings)) == sorted(
        [(radiograph.SeriesInstanceUID, "cxr"), (mr.SeriesInstanceUID, "lung-mri")])
    assert sorted(enqueued) == sorted(job_id for *_, job_id in job_rows(node_settings))


def test_sigkill_between_store_and_publish_loses_no_job(node_settings: Settings, tmp_path: Path) -> None:
    """``cradle listen`` with a broker that accepts connections and never answers: the C-STORE is
    answered 0x0000, the series is routed and its job row written, the publish hangs; SIGKILL then.
    The job is still ``queued`` and never enqueued: the reconciler sends it when it runs."""
    import storage.jobs as jobs_module
    from storage.jobs import Reconciler

    with socket.create_server(("127.0.0.1", 0)) as silent_broker:  # connections wait in its backlog
        node_settings.queue.broker_url = f"redis://127.0.0.1:{silent_broker.getsockname()[1]}/0"
        config = tmp_path / "cradle.yaml"
        config.write_text(yaml.safe_dump(node_settings.model_dump(mode="json")))
        ds = make_image()
        with cradle_listen(config, node_settings.node.port) as process:
            sent = storescu(node_settings.node.port, [write(ds, tmp_path / "cr.dcm")])
            assert sent.returncode == 0  # answered success with the publish still hanging
            wait_until(lambda: job_rows(node_settings), 10, "the job row")
            enqueued_at = rows(node_settings, Job.enqueued_at)
            process.kill()
            process.wait(10)
    assert enqueued_at == [(None,)]
    assert rows(node_settings, Job.state, Job.enqueued_at)[0][1] is None
    sessions = open_index(node_settings.storage.database_url)
    recovered = Enqueued()
    try:
        jobs_module.NEW_JOB_GRACE_SECONDS, grace = 0, jobs_module.NEW_JOB_GRACE_SECONDS
        try:
            Reconciler(sessions, recovered, node_settings.queue).run_once()
        finally:
            jobs_module.NEW_JOB_GRACE_SECONDS = grace
    finally:
        sessions.kw["bind"].dispose()
    assert recovered == [job_id for *_, job_id in job_rows(node_settings)]
