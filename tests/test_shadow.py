"""Issue 19, shadow mode, through the real path: DCMTK storescu → ``cradle serve`` → a clinical
destination SCP and a research one. BPD version A is active and B in shadow (A calls every film
positive, B negative); a third version whose weights file is damaged after it went into shadow never
touches A's results; ``--stop`` stops the extra runs; ``cradle models compare`` counts and agrees
with what was run; ``cradle models promote`` asks for shadow cases when the settings say so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import yaml
from pydicom import dcmread
from sqlalchemy import select

from conftest import free_port, require
from cradle.cli import main
from cradle.demo import Pacs
from deployment import wait_until
from inference.registry import ModelRegistry
from inference.results import SHADOW_RUN
from storage.db import open_index, transaction
from storage.models import Instance, Job, JobState, Send, Series, StudyLabel
from test_pipelines import CXR_SPEC, VIEWS, dciodvfy_errors, register_active
from training.synth import make_cxr, make_mr_series


def _cradle(config: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def _registry(tmp_path: Path, view: bool = True) -> dict[str, str]:
    registry = ModelRegistry(tmp_path / "models")
    if view:
        register_active(registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    a = register_active(registry, "bpd", "resnet18", 4.0, CXR_SPEC, threshold=0.5)
    from test_pipelines import biased_state

    b = registry.register("bpd", "resnet18", biased_state("bpd", "resnet18", -4.0, seed=1),
                          input_spec=CXR_SPEC, threshold=0.5).version
    c = registry.register("bpd", "resnet18", biased_state("bpd", "resnet18", 4.0, seed=2),
                          input_spec=CXR_SPEC, threshold=0.5)
    return {"a": a, "b": b, "c": c.version, "c_file": str(c.weights)}


def _config(tmp_path: Path, node_port: int, clinical: int, research: int, **extra: object) -> Path:
    config = tmp_path / "cradle.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"port": node_port, "allowed_calling_aets": ["MODALITY", "ECHOSCU"]},
        "storage": {"archive_dir": str(tmp_path / "archive"), "database_url": f"sqlite:///{tmp_path / 'c.db'}"},
        "queue": {"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"},
        "completion": {"quiet_seconds": 2, "poll_seconds": 0.2},
        "inference": {"gradcam": False},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": clinical},
            {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": research, "research": True},
        ],
        "models_dir": str(tmp_path / "models"),
        **extra,
    }))
    return config


def _film(tmp_path: Path, seed: int) -> tuple[Path, str]:
    ds = make_cxr(np.random.default_rng(seed), modality="CR", size=256)
    path = tmp_path / f"film-{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SeriesInstanceUID)


def _jobs(sessions, series_uid: str) -> dict[str, Job]:  # noqa: ANN001
    with sessions() as session:
        rows = session.scalars(select(Job).join(Series).where(Series.series_uid == series_uid)).all()
        return {job.shadow: job for job in rows}


def _finished(sessions, series_uid: str, shadows: set[str]) -> dict[str, Job] | None:  # noqa: ANN001
    found = _jobs(sessions, series_uid)
    done = {"", *shadows} <= set(found) and all(
        j.state in (JobState.done, JobState.failed, JobState.skipped) for j in found.values())
    return found if done else None


@pytest.mark.slow
def test_shadow_runs_beside_the_active_version(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    storescu = shutil.which("storescu", path="/usr/bin") or require("storescu")
    node_port, clinical_port, research_port = free_port(), free_port(), free_port()
    config = _config(tmp_path, node_port, clinical_port, research_port)
    versions = _registry(tmp_path)
    a, b, broken = versions["a"], versions["b"], versions["c"]
    assert _cradle(config, capsys, "models", "shadow", "bpd", a)[0] == 1  # the active one cannot shadow itself
    assert _cradle(config, capsys, "models", "shadow", "bpd", b)[0] == 0
    assert _cradle(config, capsys, "models", "shadow", "bpd", broken)[0] == 0
    Path(versions["c_file"]).write_bytes(b"damaged after it went into shadow")
    code, out, _ = _cradle(config, capsys, "models", "list", "--json")
    listed = json.loads(out)["bpd"]
    assert listed["active"] == a and [s["version"] for s in listed["shadows"]] == [b, broken]
    assert all(s["days"] >= 0 and s["since"] for s in listed["shadows"])

    clinical, research = Pacs(tmp_path / "pacs", clinical_port), Pacs(tmp_path / "research", research_port)
    clinical.start()
    research.start()
    node = subprocess.Popen([sys.executable, "-m", "cradle.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    sessions = open_index(f"sqlite:///{tmp_path / 'c.db'}")
    films = [_film(tmp_path, seed) for seed in (1, 2, 3)]
    try:
        def push(path: Path) -> None:
            run = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CRADLE", "127.0.0.1", str(node_port),
                                  str(path)], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr

        wait_until(lambda: subprocess.run([shutil.which("echoscu", path="/usr/bin") or "echoscu", "-aet", "ECHOSCU",
                                           "-aec", "CRADLE", "127.0.0.1", str(node_port)],
                                          capture_output=True).returncode == 0, 90, "the node", interval=0.5)
        push(films[0][0])
        push(films[1][0])
        for number, (_, series_uid) in enumerate(films[:2], start=1):
            wait_until(lambda: _finished(sessions, series_uid, {b, broken}), 180, f"film {number}'s jobs",
                       interval=0.3)
        wait_until(lambda: len(clinical.received) >= 2, 60, "the clinical SRs", interval=0.3)
        first = _jobs(sessions, films[0][1])
        second = _jobs(sessions, films[1][1])

        assert _cradle(config, capsys, "models", "shadow", "bpd", b, "--stop")[0] == 0
        assert _cradle(config, capsys, "models", "shadow", "bpd", broken, "--stop")[0] == 0
        push(films[2][0])
        wait_until(lambda: _finished(sessions, films[2][1], set()), 120, "film 3's job", interval=0.3)
        wait_until(lambda: len(clinical.received) >= 3, 60, "the third clinical SR", interval=0.3)
        time.sleep(1.5)  # a shadow run would have been queued when the clinical one finished
        third = _jobs(sessions, films[2][1])
    finally:
        node.terminate()
        node.wait(timeout=90)
        clinical.stop()
        research.stop()
    log = (tmp_path / "serve.log").read_text()[-3000:]

    # the clinical runs: A's SR, one per film, at the clinical destination; the damaged shadow changed nothing
    for jobs in (first, second, third):
        assert jobs[""].state == JobState.done and jobs[""].model_version.endswith(f"+{a}"), log
    assert set(third) == {""}  # --stop: no extra run on the third film
    assert len(clinical.received) == 3
    received = [dcmread(p) for p in clinical.received]
    assert {d.SOPInstanceUID for d in received} == {j[""].result["instances"][0]["sop_uid"]
                                                    for j in (first, second, third)}
    assert all(SHADOW_RUN not in d.SeriesDescription for d in received)
    for path in clinical.received:
        assert dciodvfy_errors(dcmread(path), tmp_path / "check.dcm") == []

    # B's runs: archived, marked, distinct UIDs, sent to the research destination only
    for jobs in (first, second):
        assert jobs[b].state == JobState.done and jobs[b].model_version.startswith("shadow-"), log
        assert jobs[b].started_at >= jobs[""].finished_at  # after the clinical run, never before it
        assert jobs[broken].state == JobState.failed and "sha256" in jobs[broken].error
        assert jobs[b].result["summary"]["findings"]["bpd"]["positive"] is False
        assert jobs[""].result["summary"]["findings"]["bpd"]["positive"] is True
    shadow_uids = [item["sop_uid"] for jobs in (first, second) for item in jobs[b].result["instances"]]
    with sessions() as session:
        archived = session.scalars(select(Instance).where(Instance.sop_uid.in_(shadow_uids))).all()
        sends = session.execute(select(Send.destination, Send.sop_uid, Send.status)).all()
    assert len(archived) == len(shadow_uids) == 2
    assert {(s.destination, s.sop_uid, s.status) for s in sends if s.sop_uid in shadow_uids} == {
        ("research", uid, 0) for uid in shadow_uids}
    assert not set(shadow_uids) & {d.SOPInstanceUID for d in received}
    assert {p.stem for p in research.received} == set(shadow_uids) | {d.SOPInstanceUID for d in received}
    for row in archived:
        shadow_sr = dcmread(tmp_path / "archive" / row.file_path)
        assert shadow_sr.SeriesDescription.startswith(SHADOW_RUN)
        assert dciodvfy_errors(shadow_sr, tmp_path / "check.dcm") == []
        report = hd.sr.srread(tmp_path / "archive" / row.file_path)
        assert any(getattr(item, "TextValue", "").startswith(SHADOW_RUN) for item in _content(report))

    _compare_and_promote(tmp_path, config, capsys, sessions, a, b, (first, second))


def _content(report) -> list:  # noqa: ANN001
    items, todo = [], list(report.ContentSequence)
    while todo:
        item = todo.pop()
        items.append(item)
        todo += list(item.get("ContentSequence", []))
    return items


def _compare_and_promote(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture, sessions, a: str, b: str,
                         labelled: tuple) -> None:  # noqa: ANN001
    code, out, err = _cradle(config, capsys, "models", "compare", "bpd", b, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["cases"], result["agreement"], result["disagreements"]) == (2, 0.0, 2)
    assert result["active_versions"] == [a] and result["shadow_runs"] == {"done": 2}
    assert result["probability_difference"]["mean"] < -0.9  # A says ~0.98, B ~0.02
    report = Path(result["report"])
    assert report == tmp_path / "models" / "bpd" / "reports" / b / "shadow" / "compare.html" and report.is_file()
    assert (report.parent / "probabilities.png").is_file() and f"{b} in shadow" in report.read_text()
    assert json.loads(_cradle(config, capsys, "models", "compare", "bpd", b, "--json", "--since",
                              "2999-01-01")[1])["cases"] == 0

    with transaction(sessions) as session:  # outcomes imported later: film 1 had BPD, film 2 did not
        for jobs, value in zip(labelled, (1.0, 0.0)):
            study_pk = session.get(Series, jobs[""].series_pk).study_pk
            session.add(StudyLabel(study_pk=study_pk, task="bpd", value=value, source="test"))
    labels = json.loads(_cradle(config, capsys, "models", "compare", "bpd", b, "--json")[1])["labels"]
    assert labels["cases"] == 2
    assert (labels["active"]["sensitivity"], labels["active"]["specificity"]) == (1.0, 0.0)
    assert (labels["shadow"]["sensitivity"], labels["shadow"]["specificity"]) == (0.0, 1.0)
    assert "needs at least 2" in labels["paired_test"]["not_done"]  # DeLong: see test_compare_with_labels

    gated = _config(tmp_path, free_port(), free_port(), free_port(), promotion={"min_shadow_cases": 3})
    code, _, err = _cradle(gated, capsys, "models", "promote", "bpd", b)
    assert code == 1 and "on 2 studies" in err and "min_shadow_cases asks for 3" in err
    gated = _config(tmp_path, free_port(), free_port(), free_port(),
                    promotion={"min_shadow_cases": 2, "min_shadow_agreement": 0.5})
    code, _, err = _cradle(gated, capsys, "models", "promote", "bpd", b)
    assert code == 1 and "min_shadow_agreement" in err
    assert ModelRegistry(tmp_path / "models").active("bpd").version == a
    gated = _config(tmp_path, free_port(), free_port(), free_port(), promotion={"min_shadow_cases": 2})
    assert _cradle(gated, capsys, "models", "promote", "bpd", b)[0] == 0
    assert ModelRegistry(tmp_path / "models").active("bpd").version == b


# --------------------------------------------------------------------------- in process


def _index(tmp_path: Path):  # noqa: ANN202
    from storage.archive import Archive
    from storage.ingest import Ingest

    sessions = open_index(f"sqlite:///{tmp_path / 'index.db'}")
    archive = Archive(tmp_path / "archive", fsync=False)
    return sessions, archive, Ingest(archive, sessions)


def _job(sessions, series_pk: int, shadow: str, summary: dict, instances: list | None = None) -> None:  # noqa: ANN001
    from storage.models import utcnow

    with transaction(sessions) as session:
        session.add(Job(series_pk=series_pk, pipeline="cxr", shadow=shadow, state=JobState.done, finished_at=utcnow(),
                        result={"instances": instances or [], "summary": summary}))


def _finding(probability: float, model: str) -> dict:
    return {"findings": {"bpd": {"probability": probability, "threshold": 0.5, "positive": probability >= 0.5,
                                 "model": model}}}


def _check_report(tmp_path: Path, found, plot: str) -> None:  # noqa: ANN001
    from training.shadow_report import report_dir, write_compare_report

    paths = write_compare_report(report_dir(tmp_path / "models", found), found)
    assert [p.name for p in paths] == ["compare.json", "compare.html", plot] and all(p.stat().st_size for p in paths)
    assert json.loads(paths[0].read_text())["cases"] == found.cases


def test_compare_view_calls(tmp_path: Path) -> None:
    """A view version in shadow: its labels against the active one's, frontal-chest probabilities."""
    from config.tasks import load_catalogue
    from training.shadow import compare

    sessions, archive, ingest = _index(tmp_path)
    calls = (("chest_frontal", 0.9, "chest_frontal", 0.8), ("chest_lateral", 0.2, "chest_frontal", 0.6))
    for seed, (active, p_active, shadow, p_shadow) in enumerate(calls):
        stored = ingest.store_dataset(make_cxr(np.random.default_rng(seed), modality="CR", size=64), is_result=False)
        for version, label, probability in (("", active, p_active), ("view-2", shadow, p_shadow)):
            view = {"label": label, "frontal_chest_probability": probability}
            _job(sessions, stored.series_pk, version, {"view": view})
    result = compare(sessions, archive, load_catalogue().get("view"), "view-2").as_dict()
    assert (result["cases"], result["agreement"], result["disagreements"]) == (2, 0.5, 1)
    assert result["probability_difference"]["mean"] == pytest.approx((-0.1 + 0.4) / 2) and result["labels"] is None


def test_compare_with_labels(tmp_path: Path) -> None:
    """Six films: the calls agree on four (kappa 1/3 by hand: p_o 4/6, p_e 1/2); against the labels the
    active version ranks perfectly (AUROC 1) and the shadow 8 of 9 pairs; DeLong pairs them."""
    from config.tasks import load_catalogue
    from training.shadow import compare

    sessions, archive, ingest = _index(tmp_path)
    active = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    shadow = [0.9, 0.8, 0.4, 0.3, 0.2, 0.6]
    truth = [1, 1, 1, 0, 0, 0]
    for seed, (p_active, p_shadow, label) in enumerate(zip(active, shadow, truth)):
        stored = ingest.store_dataset(make_cxr(np.random.default_rng(seed), modality="CR", size=64), is_result=False)
        _job(sessions, stored.series_pk, "", _finding(p_active, "bpd-1"))
        _job(sessions, stored.series_pk, "bpd-2", _finding(p_shadow, "bpd-2"))
        with transaction(sessions) as session:
            session.add(StudyLabel(study_pk=stored.study_pk, task="bpd", value=float(label), source="test"))
    with transaction(sessions) as session:  # a shadow run that failed counts as a run, not as a case
        session.add(Job(series_pk=stored.series_pk, pipeline="lung-mri", shadow="bpd-2", state=JobState.failed))

    found = compare(sessions, archive, load_catalogue().get("bpd"), "bpd-2")
    _check_report(tmp_path, found, "probabilities.png")
    result = found.as_dict()
    assert (result["cases"], result["disagreements"], result["shadow_runs"]) == (6, 2, {"done": 6, "failed": 1})
    assert result["agreement"] == pytest.approx(4 / 6) and result["kappa"] == pytest.approx(1 / 3)
    assert result["probability_difference"]["mean"] == pytest.approx((-0.3 + 0.5) / 6)
    labels = result["labels"]
    assert labels["cases"] == 6 and labels["active"]["auroc"] == 1.0
    assert labels["shadow"]["auroc"] == pytest.approx(8 / 9)
    assert labels["paired_test"]["auc_a"] == pytest.approx(8 / 9) and 0 < labels["paired_test"]["p_value"] < 1


def test_compare_regression(tmp_path: Path) -> None:
    """Regression (the site's toy-age, its runs reporting ``value``): mean absolute difference between the
    versions and each version's MAE against the labels, paired by Wilcoxon."""
    from config.tasks import load_catalogue
    from site_tasks import write_site_tasks
    from training.shadow import compare

    task = load_catalogue(write_site_tasks(tmp_path)).get("toy-age")
    sessions, archive, ingest = _index(tmp_path)
    for seed, (active, shadow, truth) in enumerate(((10.0, 12.0, 11.0), (20.0, 17.0, 18.0), (30.0, 30.0, 36.0),
                                                    (40.0, 44.0, 41.0))):
        stored = ingest.store_dataset(make_cxr(np.random.default_rng(seed), modality="CR", size=64), is_result=False)
        for version, value in (("", active), (f"{task.name}-2", shadow)):
            _job(sessions, stored.series_pk, version, {"findings": {task.name: {"value": value}}})
        with transaction(sessions) as session:
            session.add(StudyLabel(study_pk=stored.study_pk, task=task.name, value=truth, source="test"))
    found = compare(sessions, archive, task, f"{task.name}-2")
    _check_report(tmp_path, found, "values.png")
    result = found.as_dict()
    assert result["cases"] == 4 and result["mean_absolute_difference"] == pytest.approx((2 + 3 + 0 + 4) / 4)
    labels = result["labels"]
    assert labels["active"]["mae"] == pytest.approx((1 + 2 + 6 + 1) / 4)
    assert labels["shadow"]["mae"] == pytest.approx((1 + 1 + 6 + 3) / 4)
    assert 0 < labels["paired_test"]["p_value"] <= 1


def test_compare_segmentation_reads_both_segs(tmp_path: Path) -> None:
    """The shadow version's mask misses the left lung on three slices: the Dice of each lung between
    the archived SEGs is what the masks give, and the volume difference is the summaries'."""
    from config.tasks import load_catalogue
    from inference.results import AlgorithmIdentity
    from inference.seg import lung_segmentation
    from training.shadow import SEG_STORAGE, compare

    sessions, archive, ingest = _index(tmp_path)
    series, labels = make_mr_series(np.random.default_rng(4), shape=(10, 48, 48))
    for ds in series:
        stored = ingest.store_dataset(ds, is_result=False)
    trimmed = labels.copy()
    trimmed[3:6][trimmed[3:6] == 1] = 0
    assert (labels == 1).sum() > (trimmed == 1).sum() > 0
    for version, mask, total in (("", labels, 50.0), ("lung-seg-2", trimmed, 46.5)):
        algorithm = AlgorithmIdentity("cradle lung-seg test", f"shadow-{version}" if version else "lung-seg-1",
                                      clinical=not version)
        seg = lung_segmentation(series, mask, algorithm)
        assert dciodvfy_errors(seg, tmp_path / "check.dcm") == []
        assert seg.SeriesDescription.startswith(SHADOW_RUN) == bool(version)
        ingest.store_dataset(seg)
        with transaction(sessions) as session:
            session.add(Job(series_pk=stored.series_pk, pipeline="lung-mri", shadow=version, state=JobState.done,
                            result={"instances": [{"sop_uid": str(seg.SOPInstanceUID), "sop_class_uid": SEG_STORAGE}],
                                    "summary": {"volumes_ml": {"total": total}}}))

    found = compare(sessions, archive, load_catalogue().get("lung-seg"), "lung-seg-2")
    _check_report(tmp_path, found, "dice.png")
    result = found.as_dict()
    left = 2 * (trimmed == 1).sum() / ((labels == 1).sum() + (trimmed == 1).sum())
    assert result["cases"] == 1
    assert list(result["dice_per_segment"].values()) == [pytest.approx(left), 1.0]
    assert result["agreement"] == pytest.approx((left + 1.0) / 2)
    assert result["volume_difference_ml"]["total"]["mean"] == pytest.approx(-3.5)


def test_registry_shadows(tmp_path: Path) -> None:
    """Shadow and stop are recorded with since/by; the active version and damaged weights are refused;
    a promoted version leaves the shadows."""
    from inference.registry import RegistryError

    versions = _registry(tmp_path, view=False)
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(RegistryError, match="is the active"):
        registry.start_shadow("bpd", versions["a"])
    Path(versions["c_file"]).write_bytes(b"damaged")
    with pytest.raises(RegistryError, match="sha256"):
        registry.start_shadow("bpd", versions["c"])
    first = registry.start_shadow("bpd", versions["b"])
    assert registry.start_shadow("bpd", versions["b"]) == first  # again: the same shadow, the same since
    assert [s["version"] for s in registry.shadows("bpd")] == [versions["b"]]
    assert registry.history("bpd")[-1]["action"] == "shadow"
    registry.stop_shadow("bpd", versions["b"])
    with pytest.raises(RegistryError, match="not in shadow"):
        registry.stop_shadow("bpd", versions["b"])
    registry.start_shadow("bpd", versions["b"])
    registry.activate("bpd", versions["b"], accept_unvalidated=True, reason="test")
    assert registry.shadows("bpd") == []


@pytest.mark.postgres
def test_shadow_jobs_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """The migrated unique constraint (series, pipeline, shadow) is the one job creation relies on: a
    clinical and two shadow jobs on one series, created twice, are three rows; a second start re-queues."""
    from node.routing import create_jobs, start_shadow_jobs
    from storage.archive import Archive
    from storage.ingest import Ingest

    sessions = open_index(pg_url)
    stored = Ingest(Archive(tmp_path / "archive", fsync=False), sessions).store_dataset(
        make_cxr(np.random.default_rng(0), modality="CR", size=64), is_result=False)
    with transaction(sessions) as session:
        clinical = create_jobs(session, stored.series_pk, ["cxr"])
        shadows = start_shadow_jobs(session, stored.series_pk, "cxr", ["bpd-2", "bpd-3"])
        assert create_jobs(session, stored.series_pk, ["cxr"]) == clinical
    with transaction(sessions) as session:
        session.execute(Job.__table__.update().values(state=JobState.done))
    with transaction(sessions) as session:
        assert start_shadow_jobs(session, stored.series_pk, "cxr", ["bpd-2", "bpd-3"]) == shadows
    with sessions() as session:
        rows = session.execute(select(Job.shadow, Job.state, Job.generation)).all()
    assert sorted(rows) == [("", JobState.done, 1), ("bpd-2", JobState.queued, 2), ("bpd-3", JobState.queued, 2)]


@pytest.mark.slow
def test_shadow_results_are_marked_and_deterministic(tmp_path: Path) -> None:
    """The pipelines' shadow runs: a finding's shadow runs that finding only (with its Grad-CAM region),
    the lung shadow writes SEG and SR; every object is marked and valid, with other UIDs than the
    clinical run's, and (cxr) the same UIDs on a re-run."""
    from config.settings import load_settings
    from inference.pipelines import PipelineContext, get_pipeline
    from inference.registry import ModelCache
    from test_pipelines import SEG_SPEC, biased_state

    versions = _registry(tmp_path)
    registry = ModelRegistry(tmp_path / "models")
    register_active(registry, "pneumonia", "resnet18", -4.0, CXR_SPEC)
    register_active(registry, "lung-seg", "flexible_unet_resnet18", 8.0, SEG_SPEC)
    seg_b = registry.register("lung-seg", "flexible_unet_resnet18", biased_state("lung-seg", "flexible_unet_resnet18",
                                                                                 8.0, seed=1), input_spec=SEG_SPEC)
    settings = load_settings(None, models_dir=str(tmp_path / "models"))
    context = PipelineContext(registry=registry, device="cpu", settings=settings, models=ModelCache())
    film = [make_cxr(np.random.default_rng(7), modality="CR", size=192)]
    series, _ = make_mr_series(np.random.default_rng(8), shape=(8, 48, 48))
    runs_of = (("cxr", film, versions["c"], 2), ("lung-mri", series, seg_b.version, 1))
    for pipeline, sources, shadow, repeat in runs_of:
        clinical = get_pipeline(pipeline).run(sources, context)
        runs = [get_pipeline(pipeline).run(sources, context.for_shadow(shadow)) for _ in range(repeat)]
        assert runs[0].model_version.startswith("shadow-") and shadow in runs[0].model_version
        assert [d.SOPInstanceUID for d in runs[0].datasets] == [d.SOPInstanceUID for d in runs[-1].datasets]
        assert not {d.SOPInstanceUID for d in runs[0].datasets} & {d.SOPInstanceUID for d in clinical.datasets}
        assert not {d.SeriesInstanceUID for d in runs[0].datasets} & {d.SeriesInstanceUID for d in clinical.datasets}
        for ds in runs[0].datasets:
            assert ds.SeriesDescription.startswith(SHADOW_RUN)
            assert dciodvfy_errors(ds, tmp_path / "check.dcm") == []
        assert not any(SHADOW_RUN in d.SeriesDescription for d in clinical.datasets)
        if pipeline == "cxr":
            findings = runs[0].summary["findings"]
            assert set(findings) == {"bpd"} and findings["bpd"]["model"] == versions["c"]
            assert findings["bpd"]["region"] is True
            assert set(clinical.summary["findings"]) == {"bpd"}  # a day-1 film: pneumonia is for children
            assert clinical.summary["tasks_not_run"]["pneumonia"] == "not applicable: younger than 1 year"
            assert clinical.summary["findings"]["bpd"]["model"] == versions["a"]
    assert set(runs[0].summary["tasks_run"]) == {"lung-seg"} and len(runs[0].datasets) == 2


def test_shadow_job_yields_to_clinical_jobs_and_fails_once(tmp_path: Path) -> None:
    """The worker takes a shadow job only when no clinical job is queued (else it goes back on the queue),
    and a shadow job that raises is failed at once, never retried, its clinical job untouched."""
    from fake_pipelines import CopyPipeline, FakeHost
    from inference.worker import SHADOW_YIELD_SECONDS
    from storage.jobs import Finish
    from test_queue import make_node, make_settings

    node = make_node(make_settings(tmp_path), tmp_path)
    series_pk, _ = node.add_series()
    clinical = node.add_job(series_pk)
    with node.sessions.begin() as session:
        shadow = Job(series_pk=series_pk, pipeline="test-copy", shadow="bpd-2", state=JobState.queued)
        session.add(shadow)
        session.flush()
        shadow = shadow.id

    def run(pipeline: str, sources: list) -> object:
        if node.job(shadow).state == JobState.running:
            raise RuntimeError("a crash in the shadow model")
        return CopyPipeline().run(sources, None)

    requeued: list = []
    runner = node.runner(FakeHost(run), requeued)
    assert runner.run(shadow) == Finish.not_run
    assert requeued == [(shadow, SHADOW_YIELD_SECONDS)]
    assert (node.job(shadow).state, node.job(shadow).attempts) == (JobState.queued, 0)
    assert runner.run(clinical) == Finish.done
    assert runner.run(shadow) == Finish.failed
    failed, done = node.job(shadow), node.job(clinical)
    assert (failed.attempts, failed.state) == (1, JobState.failed) and "RuntimeError" in failed.error
    assert (done.state, done.error) == (JobState.done, "") and len(node.result_instances()) == 1

    # a shadow stopped before its job ran: the job is skipped, saying why (the real host reads the registry)
    from inference.worker import JobRunner, PipelineHost

    with node.sessions.begin() as session:
        stopped = Job(series_pk=series_pk, pipeline="cxr", shadow="bpd-9", state=JobState.queued)
        session.add(stopped)
        session.flush()
        stopped = stopped.id
    runner = JobRunner(node.settings, requeue=lambda *_: None, pipeline_host=PipelineHost)
    assert runner.run(stopped) == Finish.skipped
    assert node.job(stopped).error == "bpd-9 is no longer in shadow"
