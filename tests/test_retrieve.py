"""``cradle retrieve`` against a real PACS: Orthanc holding synthetic studies, the node as its modality.

Orthanc (Debian's, started by the browser harness's :class:`Orthanc` with the DICOM server on) gets
the studies through its REST API (``POST /instances``) and knows the node in ``DicomModalities``
(set per test through ``PUT /modalities/cradle``). The node's listener runs in this process; the
command runs in-process through ``cradle.cli.main``. Without Orthanc the PACS tests skip.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from config.settings import load_settings
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
PACS_AE = "PACS"
NODE_AE = "CRADLE"


def _load_harness():
    name = "cradle_browser_harness"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "browser" / "harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


harness = _load_harness()


@dataclass
class PacsOrthanc(harness.Orthanc):
    """The harness's Orthanc as a PACS: DICOM server on (AE ``PACS``), C-FIND and C-MOVE answered for
    any calling AE (moves go only to a known modality), C-GET only for known modalities; no plugins."""

    serve_ohif: bool = False
    dicom_port: int = field(default_factory=free_port)

    def config(self) -> dict:
        config = super().config()
        config.pop("DicomWeb", None)
        config.update({
            "Name": "cradle-retrieve-test", "Plugins": [], "DicomServerEnabled": True, "DicomAet": PACS_AE,
            "DicomPort": self.dicom_port, "DicomModalities": {}, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True, "DicomAlwaysAllowGet": False, "DicomScuTimeout": 10,
        })
        return config

    def know_node(self, port: int | None) -> None:
        """Make the node a modality of the PACS (``None``: forget it)."""
        if port is None:
            try:
                self.request("DELETE", "/modalities/cradle")
            except harness.urllib.error.HTTPError:
                pass
            return
        body = {"AET": NODE_AE, "Host": "127.0.0.1", "Port": port, "AllowGet": True, "AllowMove": True,
                "AllowFind": True}
        self.request("PUT", "/modalities/cradle", json.dumps(body).encode(), "application/json")

    def instance_count(self, study_uid: str) -> int:
        found = json.loads(self.request("POST", "/tools/lookup", study_uid.encode()))
        study = next(item["ID"] for item in found if item["Type"] == "Study")
        return int(self.get_json(f"/studies/{study}/statistics")["CountInstances"])


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """6 radiographs (one study each) and one MR study (6 slices and a reviewer SEG): 7 studies."""
    from pydicom import dcmread
    from training.synth import generate

    out = tmp_path_factory.mktemp("synthetic")
    summary = generate(out, n_cxr=6, n_mri=1, seed=5, cxr_size=64, mri_shape=(6, 32, 32))
    studies: dict[str, dict] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        study = studies.setdefault(ds.StudyInstanceUID, {"uid": ds.StudyInstanceUID, "files": [],
                                                         "accession": ds.AccessionNumber,
                                                         "patient_id": ds.PatientID, "modalities": set()})
        study["files"].append(path)
        study["modalities"].add(ds.Modality)
    assert len(studies) == summary.n_studies == 7
    for truth in json.loads(summary.truth_json.read_text())["studies"]:
        studies[truth["StudyInstanceUID"]]["neonatal_chest"] = (
            truth.get("view_class") == "chest_frontal" and truth.get("age_days", 99) <= 28)
    return studies


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, synthetic):
    if harness.orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (tests/browser/setup.sh: apt-get install orthanc)")
    with PacsOrthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(path for study in synthetic.values() for path in study["files"])
        yield server


def _radiographs(synthetic: dict) -> list[dict]:
    return [s for s in synthetic.values() if s["modalities"] & {"CR", "DX"}]


def _mr(synthetic: dict) -> dict:
    return next(s for s in synthetic.values() if "MR" in s["modalities"])


def _node_config(tmp_path: Path, pacs: PacsOrthanc | None, *, method: str = "move") -> tuple[Path, object]:
    port = free_port()
    data = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "allowed_calling_aets": [
            PACS_AE, {"ae_title": NODE_AE, "hosts": ["127.0.0.1"]}]},  # the node's own C-ECHO check
        "storage": {"archive_dir": str(tmp_path / "archive"), "database_url": f"sqlite:///{tmp_path / 'cradle.db'}"},
        "queue": {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"},
        "models_dir": str(tmp_path / "models"),
        "completion": {"quiet_seconds": 30, "poll_seconds": 0.2},
        "logging": {"audit_file": str(tmp_path / "audit.jsonl")},
        "sources": [{"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1",
                     "port": pacs.dicom_port if pacs else free_port(), "retrieve": method, "timeout": 30}],
    }
    path = tmp_path / "cradle.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_settings(path)


def _retrieve(config: Path, capsys, *args: str) -> tuple[int, dict, str]:
    from cradle.cli import main

    capsys.readouterr()
    code = main(["retrieve", "--config", str(config), "--from", "pacs", "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def _index(settings):  # noqa: ANN202
    from storage.db import open_index

    return open_index(settings.storage.database_url)


def _archived(settings) -> dict[str, int]:
    from storage.models import Instance, Series, Study

    sessions = _index(settings)
    with sessions() as session:
        rows = session.execute(select(Study.study_uid, func.count(Instance.id))
                               .join(Series, Series.study_pk == Study.id).join(Instance, Instance.series_pk == Series.id)
                               .group_by(Study.study_uid)).all()
    sessions.kw["bind"].dispose()
    return dict(rows)


def _count(settings, model) -> int:  # noqa: ANN001
    sessions = _index(settings)
    with sessions() as session:
        n = session.scalar(select(func.count()).select_from(model))
    sessions.kw["bind"].dispose()
    return n


@pytest.fixture
def listener_for():
    from node.server import Listener

    started = []

    def start(settings):  # noqa: ANN001, ANN202
        listener = Listener(settings)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


# --- against Orthanc ----------------------------------------------------------------------------

def test_move_cohort_csv_then_nothing_new_then_labels(tmp_path, pacs, synthetic, listener_for, capsys, caplog):
    from storage.models import Job, Retrieval, RetrievalState, Series, SeriesState

    config, settings = _node_config(tmp_path, pacs)
    pacs.know_node(settings.node.port)
    listener_for(settings)
    cr = _radiographs(synthetic)
    mr = _mr(synthetic)
    by_patient = next(s for s in cr[2:] if sum(o["patient_id"] == s["patient_id"] for o in synthetic.values()) == 1)
    wanted = [cr[0], cr[1], by_patient, mr]
    assert len({s["uid"] for s in wanted}) == 4
    labels = tmp_path / "outcomes.csv"
    rows = [
        {"StudyInstanceUID": cr[0]["uid"], "AccessionNumber": "", "PatientID": "", "bpd": "1"},
        {"StudyInstanceUID": "", "AccessionNumber": cr[1]["accession"], "PatientID": "", "bpd": "0"},
        {"StudyInstanceUID": "", "AccessionNumber": "", "PatientID": by_patient["patient_id"], "bpd": "1"},
        {"StudyInstanceUID": "", "AccessionNumber": mr["accession"], "PatientID": "", "bpd": ""},
    ]
    missing = {"StudyInstanceUID": "", "AccessionNumber": "NOSUCH-0042", "PatientID": "", "bpd": "0"}
    with labels.open("w", newline="") as file:
        writer = csv.DictWriter(file, ["StudyInstanceUID", "AccessionNumber", "PatientID", "bpd"])
        writer.writeheader()
        writer.writerows([*rows[:2], missing, *rows[2:]])

    caplog.set_level(logging.INFO)
    started = time.monotonic()
    code, summary, err = _retrieve(config, capsys, "--csv", str(labels))
    first_seconds = time.monotonic() - started
    assert code == 0, summary
    assert {k: summary[k] for k in ("requested", "found", "retrieved", "missing", "failed")} == \
        {"requested": 5, "found": 4, "retrieved": 4, "missing": 1, "failed": 0}
    missing_row = next(row for row in summary["rows"] if row["status"] == "missing")
    assert missing_row["row"] == "line 4" and missing_row["key_column"] == "AccessionNumber"
    assert "no study at pacs matches this AccessionNumber" in missing_row["reason"]
    assert "retrieve pacs (move)" in err  # the progress bar, on stderr

    # exactly those studies, each with Orthanc's instance count
    archived = _archived(settings)
    expected = {s["uid"]: pacs.instance_count(s["uid"]) for s in wanted}
    assert archived == expected
    assert expected[mr["uid"]] == 7 and sum(expected.values()) == 10
    assert summary["instances_received"] == 10

    # history: archived, not routed, no job; every series complete (the MR without its quiet period)
    assert _count(settings, Job) == 0
    sessions = _index(settings)
    with sessions() as session:
        series = session.scalars(select(Series)).all()
        retrievals = session.scalars(select(Retrieval)).all()
    sessions.kw["bind"].dispose()
    assert {s.state for s in series} == {SeriesState.complete}
    assert all(s.routing_reason.startswith("retrieved history (retrieval ") for s in series)
    assert {r.study_uid for r in retrievals} == set(expected)
    assert {r.state for r in retrievals} == {RetrievalState.retrieved}
    assert all(r.archived_instances == r.expected_instances == expected[r.study_uid] for r in retrievals)

    # no PHI in the logs or the audit trail: no accession number, no patient ID
    audit = (tmp_path / "audit.jsonl").read_text()
    finished = [json.loads(line) for line in audit.splitlines() if '"retrieval.finished"' in line]
    assert len(finished) == 4 and {event.get("state") for event in finished} == {"retrieved"}, finished
    for secret in ["NOSUCH-0042", *(s["accession"] for s in synthetic.values()),
                   *(s["patient_id"] for s in synthetic.values())]:
        assert secret not in caplog.text and secret not in audit, secret

    # a second run brings nothing new
    code, again, _ = _retrieve(config, capsys, "--csv", str(labels))
    assert code == 0
    assert (again["retrieved"], again["already_archived"], again["missing"], again["failed"]) == (0, 4, 1, 0)
    assert again["instances_received"] == 0 and _archived(settings) == expected
    assert _count(settings, Retrieval) == 4
    print(f"\nC-MOVE: 4 studies / 10 instances (Orthanc: {sum(expected.values())}) in {summary['seconds']:.2f} s "
          f"(command {first_seconds:.2f} s); second run {again['seconds']:.2f} s")

    # labels follow: the same CSV without the missing row matches the retrieved studies
    from training.labels import import_labels

    kept = tmp_path / "outcomes-found.csv"
    kept.write_text("\n".join(line for line in labels.read_text().splitlines() if "NOSUCH" not in line) + "\n")
    sessions = _index(settings)
    report = import_labels(sessions, kept)
    sessions.kw["bind"].dispose()
    assert report.ok and report.applied and report.studies == 3, report.rejections  # the MR row has no value


def test_move_with_run_pipelines_routes_like_a_live_push(tmp_path, pacs, synthetic, listener_for, capsys):
    from storage.models import Job

    config, settings = _node_config(tmp_path, pacs)
    pacs.know_node(settings.node.port)
    listener_for(settings)
    study = next(s for s in _radiographs(synthetic) if s["neonatal_chest"])
    code, summary, _ = _retrieve(config, capsys, "--study", study["uid"], "--run-pipelines")
    assert code == 0 and summary["retrieved"] == 1
    assert _count(settings, Job) == 1  # a day-1 frontal chest film: the cxr pipeline's job


def test_get_without_listener(tmp_path, pacs, synthetic, capsys):
    from storage.models import Instance, Job

    config, settings = _node_config(tmp_path, pacs, method="get")
    pacs.know_node(settings.node.port)  # Orthanc answers C-GET for known modalities only
    wanted = [_radiographs(synthetic)[4], _mr(synthetic)]
    code, summary, _ = _retrieve(config, capsys, "--accession", *(s["accession"] for s in wanted))
    assert code == 0, summary
    assert (summary["requested"], summary["found"], summary["retrieved"], summary["failed"]) == (2, 2, 2, 0)
    assert summary["method"] == "get"
    expected = {s["uid"]: pacs.instance_count(s["uid"]) for s in wanted}
    assert _archived(settings) == expected
    assert _count(settings, Job) == 0
    sessions = _index(settings)
    with sessions() as session:  # stored as sent by the PACS, not by the node itself
        assert set(session.scalars(select(Instance.calling_ae_title))) == {PACS_AE}
    sessions.kw["bind"].dispose()
    code, again, _ = _retrieve(config, capsys, "--accession", *(s["accession"] for s in wanted))
    assert (again["retrieved"], again["already_archived"], again["instances_received"]) == (0, 2, 0)
    print(f"\nC-GET: 2 studies / {summary['instances_received']} instances (Orthanc: {sum(expected.values())}) "
          f"in {summary['seconds']:.2f} s")


def test_refused_move_is_reported(tmp_path, pacs, synthetic, listener_for, capsys):
    from storage.models import Retrieval, RetrievalState

    config, settings = _node_config(tmp_path, pacs)
    pacs.know_node(None)  # the PACS does not know the node: it cannot move to it
    listener_for(settings)
    study = _radiographs(synthetic)[5]
    code, summary, _ = _retrieve(config, capsys, "--study", study["uid"])
    assert code == 1
    assert (summary["found"], summary["retrieved"], summary["failed"]) == (1, 0, 1)
    reason = summary["rows"][0]["reason"]
    # Orthanc 1.10 answers an unknown move destination with 0xC000 (others with 0xA801)
    assert "C-MOVE refused by the source: 0x" in reason, reason
    print(f"\nrefused C-MOVE reported as: {reason}")
    assert f"must know this node's AE title {NODE_AE}" in reason
    assert _archived(settings) == {}
    sessions = _index(settings)
    with sessions() as session:
        retrieval = session.scalars(select(Retrieval)).one()
    sessions.kw["bind"].dispose()
    assert retrieval.state == RetrievalState.failed and "C-MOVE refused" in retrieval.reason


def test_move_needs_the_listener(tmp_path, pacs, synthetic, capsys):
    from cradle.cli import main

    config, settings = _node_config(tmp_path, pacs)
    capsys.readouterr()
    assert main(["retrieve", "--config", str(config), "--from", "pacs", "--study", "1.2.3"]) == 1
    assert "the node's listener does not answer" in capsys.readouterr().err


def test_unreachable_source_fails_every_row(tmp_path, capsys):
    config, _settings = _node_config(tmp_path, None, method="get")
    code, summary, _ = _retrieve(config, capsys, "--accession", "A1", "A2")
    assert code == 1 and summary["failed"] == 2 and summary["found"] == 0
    assert "no association with PACS" in summary["rows"][0]["reason"]


# --- without a PACS -----------------------------------------------------------------------------

def test_unknown_source_and_bad_csv(tmp_path, capsys):
    from cradle.cli import main

    config, _ = _node_config(tmp_path, None)
    assert main(["retrieve", "--config", str(config), "--from", "other", "--study", "1.2"]) == 2
    assert "no source named 'other'" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("AccessionNumber,PatientID,StudyDate,bpd\nA1,,,1\n,,,0\n,P9,2025-01-01,1\n,P*,,1\n")
    assert main(["retrieve", "--config", str(config), "--from", "pacs", "--csv", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 3: empty key" in err and "line 4: StudyDate is not a DICOM date" in err
    assert "line 5: the PatientID contains a wildcard" in err  # never widened to the whole PACS
    assert "P9" not in err and "P*" not in err
    assert main(["retrieve", "--config", str(config), "--from", "pacs", "--study", "1.2.3", "1.2.x"]) == 2
    assert "--study 2: not a UID" in capsys.readouterr().err


def test_read_keys_uses_the_labels_rules(tmp_path):
    from cradle.retrieve import read_keys

    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffStudyInstanceUID;AccessionNumber;PatientID;StudyDate;bpd\n"
                     "1.2.3;A1;P1;;1\n;A2;P2;;0\n;;P3;20250101-20250131;1\n\n".encode())
    keys = read_keys(path)
    assert [(k.key_column, k.key, k.where, k.study_date) for k in keys] == [
        ("StudyInstanceUID", "1.2.3", "line 2", ""), ("AccessionNumber", "A2", "line 3", ""),
        ("PatientID", "P3", "line 4", "20250101-20250131")]
    assert [k.shown for k in keys] == ["1.2.3", None, None]


def test_window():
    from node.cohort import Window

    night = Window.parse("20:00-06:00")
    assert night.contains(dt.datetime(2026, 1, 1, 23, 0)) and night.contains(dt.datetime(2026, 1, 1, 5, 59))
    assert not night.contains(dt.datetime(2026, 1, 1, 6, 0))
    assert night.seconds_until_open(dt.datetime(2026, 1, 1, 19, 0)) == 3600
    assert night.seconds_until_open(dt.datetime(2026, 1, 1, 21, 0)) == 0
    day = Window.parse("08:00-17:00")
    assert day.seconds_until_open(dt.datetime(2026, 1, 1, 18, 0)) == 14 * 3600
    with pytest.raises(ValueError):
        Window.parse("8-17")
    with pytest.raises(Exception, match="HH:MM-HH:MM"):
        load_settings(None, sources=[{"name": "p", "ae_title": "P", "host": "h", "port": 104, "window": "25:00-01:00"}])
    with pytest.raises(Exception, match="given twice"):
        load_settings(None, sources=[{"name": "p", "ae_title": "P", "host": "h", "port": 104}] * 2)


def test_retriever_waits_for_its_window(tmp_path):
    """A study starts only inside the window: the retriever sleeps until it opens."""
    from node.cohort import Window
    from node.retrieve import Retriever

    _config, settings = _node_config(tmp_path, None)
    now = [dt.datetime(2026, 1, 1, 18, 30)]
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += dt.timedelta(seconds=seconds)

    retriever = Retriever(settings, settings.sources[0], _index(settings), window=Window.parse("20:00-06:00"),
                          clock=lambda: now[0], sleep=sleep)
    retriever._wait_for_window()
    assert sum(slept) == 90 * 60 and now[0].hour == 20 and max(slept) <= 60


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_history_marker_schema_and_window(backend, tmp_path, request):
    """The migration creates what the models say, on SQLite and PostgreSQL, and completion's
    history check covers a series whose last instance arrived during the retrieval only."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from node.routing import history_retrieval
    from storage.db import create_db_engine, migrate, session_factory, transaction
    from storage.models import Base, Retrieval, RetrievalState

    url = f"sqlite:///{tmp_path / 'index.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = create_db_engine(url)
    migrate(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    sessions = session_factory(engine)
    t0 = dt.datetime(2026, 12, 1, 10, 0)
    with transaction(sessions) as session:
        session.add_all([
            Retrieval(study_uid="1.2.3", source="pacs", method="move", run_pipelines=False,
                      state=RetrievalState.retrieved, requested_at=t0, finished_at=t0 + dt.timedelta(minutes=5)),
            Retrieval(study_uid="1.2.4", source="pacs", method="move", run_pipelines=True,
                      state=RetrievalState.retrieved, requested_at=t0, finished_at=t0 + dt.timedelta(minutes=5)),
            Retrieval(study_uid="1.2.5", source="pacs", method="get", run_pipelines=False,
                      state=RetrievalState.retrieving, requested_at=t0),
        ])
    with sessions() as session:
        during = t0 + dt.timedelta(minutes=2)
        assert history_retrieval(session, "1.2.3", during) is not None
        assert history_retrieval(session, "1.2.3", t0 - dt.timedelta(minutes=1)) is None  # a live push before
        assert history_retrieval(session, "1.2.3", t0 + dt.timedelta(hours=1)) is None  # and after
        assert history_retrieval(session, "1.2.4", during) is None  # --run-pipelines
        assert history_retrieval(session, "1.2.5", t0 + dt.timedelta(hours=2)) is not None  # still running
        assert history_retrieval(session, "1.2.5", t0 + dt.timedelta(hours=25)) is None  # killed long ago
        assert history_retrieval(session, "9.9", during) is None
    engine.dispose()


def test_history_is_not_routed():
    from node.routing import SeriesFacts, decide
    from config.settings import Settings

    facts = SeriesFacts(modality="CR", sop_class_uids=frozenset(), body_part="CHEST", series_description="",
                        age_days=1)
    rules = Settings().routing.rules
    assert decide(rules, facts).pipelines == ("cxr",)
    history = decide(rules, SeriesFacts(**{**facts.__dict__, "history_retrieval": 7}))
    assert history.pipelines == () and "retrieved history (retrieval 7)" in history.reason
