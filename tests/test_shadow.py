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
from training.synth import make_cxr


def _cradle(config: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def _registry(tmp_path: Path) -> dict[str, str]:
    registry = ModelRegistry(tmp_path / "models")
    register_active(registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    a = register_active(registry, "bpd", "resnet18", 4.0, CXR_SPEC, threshold=0.5)
    from test_pipelines import biased_state

    b = registry.register("bpd", "resnet18", biased_state("bpd", "resnet18", -4.0, seed=1),
                          input_spec=CXR_SPEC, threshold=0.5).version
    broken = registry.register("bpd", "resnet18", biased_state("bpd", "resnet18", 4.0, seed=2),
                               input_spec=CXR_SPEC, threshold=0.5)
    return {"a": a, "b": b, "broken": broken.version, "broken_file": str(broken.weights)}


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
        "training": {"runs_dir": str(tmp_path / "runs")},
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
    a, b, broken = versions["a"], versions["b"], versions["broken"]
    assert _cradle(config, capsys, "models", "shadow", "bpd", a)[0] == 1  # the active one cannot shadow itself
    assert _cradle(config, capsys, "models", "shadow", "bpd", b)[0] == 0
    assert _cradle(config, capsys, "models", "shadow", "bpd", broken)[0] == 0
    Path(versions["broken_file"]).write_bytes(b"damaged after it went into shadow")
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
        for number, (path, series_uid) in enumerate(films[:2], start=1):
            push(path)
            wait_until(lambda: _finished(sessions, series_uid, {b, broken}), 180, f"film {number}'s jobs",
                       interval=0.3)
            wait_until(lambda: len(clinical.received) >= number, 60, "the clinical SR", interval=0.3)
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
    assert Path(result["report"]).is_file() and (Path(result["report"]).parent / "probabilities.png").is_file()
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
    assert "p_value" in labels["paired_test"]

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
