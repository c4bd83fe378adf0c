"""Training labels: CSV import (validation, line numbers, all-or-nothing), person-made lung SEGs,
view labels from headers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from config.tasks import YES_NO_POSITIVE
from config.views import ViewHeader, load_view_taxonomy
from cradle.cli import main
from storage.archive import Archive
from storage.db import open_index, transaction
from storage.index import InstanceHeader
from storage.ingest import Ingest
from storage.models import Study, StudyLabel
from site_tasks import SITE_TASKS
from training import synth
from training.labels import (import_labels, judge_segmentation, parse_binary, parse_gestational_age, parse_irds_grade,
                             read_label_file, reference_segmentations)

# --- an index with a few studies --------------------------------------------------------------


def _file_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store(ingest: Ingest, ds: Dataset, calling_ae: str = "MODALITY", is_result: bool = False) -> None:
    ingest.store(_file_bytes(ds), InstanceHeader.from_dataset(ds), calling_ae_title=calling_ae,
                 transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), is_result=is_result)


@pytest.fixture
def node(node_settings: Settings) -> tuple[Ingest, sessionmaker[Session]]:
    archive = Archive(node_settings.storage.archive_dir, fsync=False)
    archive.ensure_root()
    sessions = open_index(node_settings.storage.database_url)
    return Ingest(archive, sessions), sessions


@pytest.fixture
def studies(node: tuple[Ingest, sessionmaker[Session]]) -> dict[str, dict[str, str]]:
    """Four small radiograph studies of three patients on four days (patient P3 has two studies, one accession
    number is shared by two studies)."""
    ingest, _ = node
    rng = np.random.default_rng(0)
    made = {}
    for index, (patient, accession) in enumerate([("P1", "A1"), ("P2", "A2"), ("P3", "A3"), ("P3", "A3")]):
        baby = synth.make_neonate(rng, index + 1, dt.date(2024, 3, 1))
        baby = dataclasses.replace(baby, patient_id=patient)
        study = synth.make_study(baby, index + 1, dt.datetime(2024, 3, 2 + index, 8), key=("labels", index))
        study = dataclasses.replace(study, accession_number=accession)
        ds = synth.make_cxr(rng, study=study, size=64)
        _store(ingest, ds)
        made[f"S{index + 1}"] = {"uid": ds.StudyInstanceUID, "patient": patient, "accession": accession}
    return made


def _labels(sessions: sessionmaker[Session]) -> dict[tuple[str, str], float]:
    with sessions() as session:
        rows = session.execute(select(Study.study_uid, StudyLabel.task, StudyLabel.value)
                               .join(Study, StudyLabel.study_pk == Study.id)).all()
    return {(uid, task): value for uid, task, value in rows}


# --- values -----------------------------------------------------------------------------------


def test_values_in_every_accepted_spelling() -> None:
    assert [parse_binary(v) for v in ("1", "yes", "TRUE", "y", "0", "No", "false")] == [1, 1, 1, 1, 0, 0, 0]
    assert [parse_irds_grade(v) for v in ("0", "3", "IV", "ii")] == [0, 3, 4, 2]
    assert parse_gestational_age("27+3") == pytest.approx(27 + 3 / 7, abs=1e-4)
    assert parse_gestational_age("31.5") == 31.5
    for parser, bad in ((parse_binary, "maybe"), (parse_irds_grade, "5"), (parse_gestational_age, "52"),
                        (parse_gestational_age, "soon")):
        with pytest.raises(ValueError):
            parser(bad)


def test_header_problems_are_reported_on_line_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("MRN,bpd,colour\nx,1,red\n")
    rows, rejections = read_label_file(path)
    assert rows == []
    reasons = " / ".join(r.reason for r in rejections)
    assert {r.line for r in rejections} == {1}
    assert "unknown column(s): MRN, colour" in reasons and "no key column" in reasons


# --- import -----------------------------------------------------------------------------------


def test_a_study_date_narrows_a_patient_id_as_retrieve_reads_it(tmp_path: Path, node_settings: Settings,
                                                               node: tuple, studies: dict,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The labels CSV of ``cradle retrieve`` (PatientID + StudyDate) is accepted by labels import: the date
    (or range) picks that patient's studies; a date with no study is a rejection naming no identifier."""
    _, sessions = node
    with sessions() as session:
        dates = dict(session.execute(select(Study.study_uid, Study.study_date)).all())
    first, second = (studies[k]["uid"] for k in ("S3", "S4"))
    assert dates[first] != dates[second], "P3's two studies must differ in date for this test"
    day = dates[second].strftime("%Y%m%d")
    path = tmp_path / "labels.csv"
    config = tmp_path / "cradle.yaml"
    config.write_text(json.dumps({"storage": {"archive_dir": str(node_settings.storage.archive_dir),
                                              "database_url": node_settings.storage.database_url}}))
    path.write_text(f"PatientID,StudyDate,bpd\nP3,-19990101,0\nP1,2024031,1\n")
    assert main(["labels", "import", str(path), "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "line 2: no archived study of this PatientID has that StudyDate" in err
    assert "line 3: StudyDate: '2024031' is not a DICOM date or range" in err
    path.write_text(f"PatientID,StudyDate,bpd\nP3,{day},1\n")
    assert main(["labels", "import", str(path), "--config", str(config)]) == 0
    assert _labels(sessions) == {(second, "bpd"): 1.0}
    path.write_text(f"PatientID,StudyDate,bpd\nP3,{day}-,1\n")
    rows, rejections = read_label_file(path)
    assert rejections == [] and rows[0].study_dates == (dates[second], None)
    with sessions() as session:
        from training.labels import studies_for
        picked, problem = studies_for(session, "PatientID", "P3", rows[0].study_dates)
        none, reason = studies_for(session, "PatientID", "P3", (None, dt.date(1999, 1, 1)))
    assert problem is None and len(picked) == 1 and none == []
    assert reason == "no archived study of this PatientID has that StudyDate"


def test_import_by_study_accession_and_patient(tmp_path: Path, node: tuple, studies: dict) -> None:
    _, sessions = node
    path = tmp_path / "labels.csv"
    path.write_text(
        "StudyInstanceUID,AccessionNumber,PatientID,bpd,pneumonia,irds_grade,gestational_age_weeks,birth_weight_g\n"
        f"{studies['S1']['uid']},,,yes,0,II,26+4,820\n"
        f",A2,,0,,,,\n"
        f",,P3,1,true,,,\n"
        ",,,,,,,\n")  # a blank line is skipped
    report = import_labels(sessions, path)
    assert report.ok and report.applied
    labels = _labels(sessions)
    assert labels[(studies["S1"]["uid"], "bpd")] == 1.0
    assert labels[(studies["S1"]["uid"], "irds_grade")] == 2.0
    assert labels[(studies["S1"]["uid"], "gestational_age_weeks")] == pytest.approx(26.571, abs=1e-3)
    assert labels[(studies["S2"]["uid"], "bpd")] == 0.0
    assert (studies["S2"]["uid"], "pneumonia") not in labels  # empty = unknown
    # pneumonia is by type; "true" says only "some pneumonia": stored as such (a binary recipe learns it)
    assert labels[(studies["S3"]["uid"], "pneumonia")] == labels[(studies["S4"]["uid"], "pneumonia")] == YES_NO_POSITIVE
    assert labels[(studies["S1"]["uid"], "pneumonia")] == 0.0  # "0": normal, the first class
    with sessions() as session:
        sources = set(session.scalars(select(StudyLabel.source)))
    assert sources == {"labels.csv:2", "labels.csv:3", "labels.csv:4"}


def test_any_rejected_row_applies_nothing_and_names_every_line(tmp_path: Path, node: tuple,
                                                                studies: dict) -> None:
    _, sessions = node
    first = tmp_path / "first.csv"
    first.write_text(f"StudyInstanceUID,bpd\n{studies['S2']['uid']},1\n")
    assert import_labels(sessions, first).applied
    before = _labels(sessions)

    path = tmp_path / "labels.csv"
    path.write_text(
        "StudyInstanceUID,AccessionNumber,bpd,pneumonia,birth_weight_g\n"
        f"{studies['S1']['uid']},,1,0,900\n"                    # 2: fine
        f"{studies['S2']['uid']},,0,maybe,900\n"                # 3: bad value
        "1.2.3.4.5.6.7.8.9,,1,,\n"                              # 4: unknown study
        ",A3,1,,\n"                                             # 5: accession of two studies
        f"{studies['S1']['uid']},,0,,\n"                        # 6: contradicts line 2
        f"{studies['S2']['uid']},,1,\n"                         # 7: too few fields
        f"{studies['S1']['uid']},,,,12\n"                       # 8: implausible weight
        f",,1,0,\n")                                            # 9: no key
    report = import_labels(sessions, path)
    assert not report.applied
    lines = {r.line: r.reason for r in report.rejections}
    assert sorted(lines) == [3, 4, 5, 6, 7, 8, 9]
    assert "pneumonia: 'maybe' is not one of normal, bacterial, viral (or 0/1)" in lines[3]
    assert "no archived study has this StudyInstanceUID" in lines[4]
    assert "matches 2 archived studies" in lines[5]
    assert "contradicts line 2" in lines[6]
    assert "5 fields" in lines[7] or "4 fields" in lines[7]
    assert "birth_weight_g" in lines[8]
    assert "empty key" in lines[9]
    assert "1.2.3.4.5.6.7.8.9" not in " ".join(lines.values())  # identifiers are not echoed
    assert _labels(sessions) == before  # nothing of the file applied, earlier labels untouched


def test_cli_exit_code_and_report(tmp_path: Path, node_settings: Settings, node: tuple, studies: dict,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cradle.yaml"
    config.write_text(json.dumps({"storage": {"archive_dir": str(node_settings.storage.archive_dir),
                                              "database_url": node_settings.storage.database_url}}))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"PatientID,bpd\nP1,2\nP9,1\n")
    assert main(["labels", "import", str(bad), "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "2 problem(s); nothing was applied" in err
    assert "line 2: bpd: '2' is not 0/1" in err and "line 3: no archived patient has this PatientID" in err
    good = tmp_path / "good.csv"
    good.write_text("PatientID,bpd\nP1,1\nP2,no\n")
    assert main(["labels", "import", str(good), "--config", str(config)]) == 0
    assert "2 labels on 2 studies applied" in capsys.readouterr().out


# --- lung masks -------------------------------------------------------------------------------


@pytest.fixture
def mr_with_segs(node: tuple) -> dict[str, Dataset]:
    """One MR series with a reviewer's MANUAL SEG, an AUTOMATIC SEG from a reviewer AE, and the
    node's own AI SEG (stored as a result)."""
    ingest, _ = node
    rng = np.random.default_rng(1)
    series, labels = synth.make_mr_series(rng, shape=(4, 32, 32))
    for ds in series:
        _store(ingest, ds)
    manual = synth.make_reference_seg(series, labels)
    _store(ingest, manual, calling_ae="PACS")
    return {"series": series[0], "manual": manual, "labels": labels, "slices": series}


def _automatic(seg: Dataset, uid_suffix: str) -> Dataset:
    ds = dcmread(BytesIO(_file_bytes(seg)))
    for item in ds.SegmentSequence:
        item.SegmentAlgorithmType = "AUTOMATIC"
        item.SegmentAlgorithmName = "cradle lung-seg"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, uid_suffix])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, uid_suffix])
    return ds


def test_only_person_made_segs_count(node: tuple, mr_with_segs: dict) -> None:
    ingest, sessions = node
    manual = mr_with_segs["manual"]
    assert judge_segmentation(manual, "PACS", [])[1] == "SegmentAlgorithmType MANUAL"
    automatic = _automatic(manual, ".1")
    assert judge_segmentation(automatic, "PACS", []) == ((), None)
    assert judge_segmentation(automatic, "REVIEW", ["REVIEW"])[1] == "received from reviewer AE REVIEW"

    _store(ingest, _automatic(manual, ".2"), calling_ae="PACS")  # an AI SEG pushed back: ignored
    with sessions() as session:
        found = reference_segmentations(session, ingest.archive, reviewer_aets=[])
    assert [r.seg_sop_uid for r in found] == [manual.SOPInstanceUID]
    assert found[0].mr_series_uid == mr_with_segs["series"].SeriesInstanceUID
    assert found[0].segment_numbers == (1, 2)


def test_the_nodes_own_seg_never_counts_even_from_a_reviewer(node: tuple, mr_with_segs: dict) -> None:
    ingest, sessions = node
    own = _automatic(mr_with_segs["manual"], ".3")
    _store(ingest, own, calling_ae="REVIEW", is_result=True)
    corrected = _automatic(mr_with_segs["manual"], ".4")
    _store(ingest, corrected, calling_ae="REVIEW")
    with sessions() as session:
        found = reference_segmentations(session, ingest.archive, reviewer_aets=["REVIEW"])
    # the reviewer's correction arrived last and supersedes the MANUAL one; the node's own never counts
    assert [r.seg_sop_uid for r in found] == [corrected.SOPInstanceUID]


# --- views ------------------------------------------------------------------------------------


def test_view_labels_from_headers_match_the_synthetic_truth(tmp_path: Path) -> None:
    summary = synth.generate(tmp_path / "synth", n_cxr=27, n_mri=0, seed=11, cxr_size=64)
    truth = json.loads(summary.truth_json.read_text())
    taxonomy = load_view_taxonomy()
    checked = 0
    for study in truth["studies"]:
        ds = dcmread(summary.outdir / study["path"], stop_before_pixels=True)
        header = ViewHeader(ds.Modality, ds.get("BodyPartExamined", ""), ds.get("ViewPosition", ""),
                            ds.get("SeriesDescription", ""), ds.get("ProtocolName", ""),
                            ds.get("StudyDescription", ""))
        assert taxonomy.label_of(header) == study["view_class"], study["path"]
        checked += 1
    assert checked == 27
    fine = load_view_taxonomy("views30")
    assert fine.label_of(ViewHeader("DX", "CHEST", "AP")) == "chest_ap_supine"
    assert fine.label_of(ViewHeader("CR", "KNEE")) == "knee"
    assert taxonomy.label_of(ViewHeader("CR", "KNEE")) == "extremity"
    assert taxonomy.label_of(ViewHeader("MR", "CHEST")) is None


# --- a site's own tasks (config/tasks.yaml's layout, task_catalogue) ---------------------------


@pytest.fixture
def site_catalogue(tmp_path: Path):  # noqa: ANN201 - a TaskCatalogue
    from config.tasks import load_catalogue

    site = tmp_path / "site-tasks.yaml"
    site.write_text(SITE_TASKS)
    return load_catalogue(site)


def test_a_site_task_is_a_label_column_with_no_code_change(tmp_path: Path, node: tuple, studies: dict,
                                                            site_catalogue) -> None:  # noqa: ANN001
    _, sessions = node
    path = tmp_path / "site.csv"
    path.write_text("StudyInstanceUID,bpd,toy,toy_grade,toy_age\n"
                    f"{studies['S1']['uid']},1,yes,Moderate,18.5\n"
                    f"{studies['S2']['uid']},,0,grade 3,\n"
                    f"{studies['S3']['uid']},,,none,240\n")
    _, rejections = read_label_file(path)  # the shipped catalogue does not know the site's columns
    assert "unknown column(s): toy, toy_grade, toy_age" in rejections[0].reason
    report = import_labels(sessions, path, site_catalogue)
    assert report.ok and report.applied and report.labels_written == 8
    labels = _labels(sessions)
    s1, s2, s3 = (studies[k]["uid"] for k in ("S1", "S2", "S3"))
    assert labels[(s1, "toy")] == 1.0 and labels[(s2, "toy")] == 0.0  # stored by task name
    assert [labels[(s, "toy-grade")] for s in (s1, s2, s3)] == [1.0, 2.0, 0.0]  # class index, aliases folded
    assert labels[(s1, "toy-age")] == 18.5 and labels[(s3, "toy-age")] == 240.0
    assert labels[(s1, "bpd")] == 1.0


def test_a_site_tasks_values_are_checked_by_its_kind(tmp_path: Path, site_catalogue) -> None:  # noqa: ANN001
    path = tmp_path / "bad.csv"
    path.write_text("PatientID,toy,toy_grade,toy_age\nP1,maybe,,\nP2,,moderately,\nP3,,,241\nP4,,,soon\n")
    rows, rejections = read_label_file(path, site_catalogue)
    assert rows == []
    assert [str(r) for r in rejections] == [
        "line 2: toy: 'maybe' is not 0/1, yes/no or true/false",
        "line 3: toy_grade: 'moderately' is not one of none, mild, severe",
        "line 4: toy_age: 241 is outside the plausible toy-age (months) range 0-240",
        "line 5: toy_age: 'soon' is not a number"]


def test_cradle_labels_import_takes_the_site_catalogue(tmp_path: Path, node_settings: Settings, node: tuple,
                                                       studies: dict, capsys: pytest.CaptureFixture) -> None:
    _, sessions = node
    site = tmp_path / "site-tasks.yaml"
    site.write_text(SITE_TASKS)
    config = tmp_path / "cradle.yaml"
    config.write_text(json.dumps({"storage": {"archive_dir": str(node_settings.storage.archive_dir),
                                              "database_url": node_settings.storage.database_url},
                                  "task_catalogue": str(site)}))
    path = tmp_path / "toy.csv"
    path.write_text(f"StudyInstanceUID,toy\n{studies['S1']['uid']},yes\n")
    assert main(["labels", "import", str(path), "--config", str(config)]) == 0
    assert "1 labels on 1 studies applied" in capsys.readouterr().out
    assert _labels(sessions)[(studies["S1"]["uid"], "toy")] == 1.0
