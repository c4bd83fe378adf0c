"""Children's synthetic films: pediatric chests (pneumonia by type), extremities (fracture), hands
(bone age): DICOM conformance, labels, views from the header rules, and no change to the neonatal
files when children are added."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from config.views import ViewHeader, load_view_taxonomy
from training import synth
from training.synth.extremity import LIMB_SEGMENTS

COUNTS = {"n_pediatric_cxr": 6, "n_extremity": 8, "n_hand": 6}
SEGMENT_VIEWS30 = {"forearm": "forearm", "lower_leg": "tibia_fibula", "humerus": "humerus", "femur": "femur",
                   "hand": "hand_wrist", "chest": "chest_pa"}


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthSummary:
    return synth.generate(tmp_path_factory.mktemp("children") / "out", n_cxr=4, n_mri=0, seed=5, cxr_size=128,
                          **COUNTS)


@pytest.fixture(scope="module")
def studies(children: synth.SynthSummary) -> dict[str, dict]:
    truth = json.loads(children.truth_json.read_text())
    patients = {p["PatientID"]: p for p in truth["patients"]}
    return {s["StudyInstanceUID"]: {**s, "patient": patients[s["PatientID"]]} for s in truth["studies"]
            if "anatomy" in s}


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_children_films_have_zero_dciodvfy_errors(children: synth.SynthSummary) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    assert len(children.pediatric_paths) == sum(COUNTS.values()) == 20
    failures = {}
    for path in children.pediatric_paths:
        run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        if errors:
            failures[path.name] = errors
    assert failures == {}


def test_labels_of_children(children: synth.SynthSummary, studies: dict[str, dict]) -> None:
    with children.labels_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == (*synth.LABEL_COLUMNS, "fracture", "bone_age_months")
        rows = {row["StudyInstanceUID"]: row for row in reader}
    assert len(rows) == 4 + 20
    by_anatomy: dict[str, list[dict]] = {}
    for uid, study in studies.items():
        row = rows[uid]
        assert row["bpd"] == row["irds_grade"] == row["gestational_age_weeks"] == row["birth_weight_g"] == ""
        by_anatomy.setdefault("chest" if study["anatomy"] == "chest" else
                              "hand" if study["anatomy"] == "hand" else "limb", []).append({**row, **study})
    assert Counter(r["pneumonia"] for r in by_anatomy["chest"]) == {"normal": 2, "bacterial": 2, "viral": 2}
    assert Counter((r["anatomy"], r["fracture"]) for r in by_anatomy["limb"]) == {
        (segment, fracture): 1 for segment in LIMB_SEGMENTS for fracture in ("0", "1")}
    for row in by_anatomy["hand"]:
        age_months = row["age_days"] * 12 / 365.25
        assert 12 <= age_months <= 17 * 12 and abs(float(row["bone_age_months"]) - age_months) < 50
        assert float(row["bone_age_months"]) == row["patient"]["bone_age_months"]
    for rows_ in by_anatomy.values():
        assert all(r["patient"]["child"] and not r["patient"]["neonate"] for r in rows_)


def test_views_and_ages_from_the_headers(children: synth.SynthSummary, studies: dict[str, dict]) -> None:
    views7, views30 = load_view_taxonomy("views7"), load_view_taxonomy("views30")
    seen = Counter()
    for path in children.pediatric_paths:
        ds = _header(path)
        study = studies[ds.StudyInstanceUID]
        header = ViewHeader(ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.SeriesDescription,
                            ds.ProtocolName, ds.StudyDescription)
        expected7 = "chest_frontal" if study["anatomy"] == "chest" else "extremity"
        assert (views7.label_of(header), views30.label_of(header)) == (expected7, SEGMENT_VIEWS30[study["anatomy"]])
        assert study["view_class"] == expected7
        years = study["age_days"] / 365.25
        low, high = (1, 5) if study["anatomy"] == "chest" else (1, 17)
        assert low <= years <= high and ds.PatientAge[-1] in "MY"
        assert ds.ImageComments == synth.SYNTHETIC_COMMENT and "PatientPosition" not in ds
        seen[expected7] += 1
    assert seen == {"chest_frontal": 6, "extremity": 14}


def test_same_seed_same_children_and_no_change_to_the_neonatal_files(tmp_path: Path,
                                                                      children: synth.SynthSummary) -> None:
    alone = synth.generate(tmp_path / "alone", n_cxr=4, n_mri=0, seed=5, cxr_size=128)
    assert [p.read_bytes() for p in alone.cxr_paths] == [p.read_bytes() for p in children.cxr_paths]
    again = synth.generate(tmp_path / "again", n_cxr=4, n_mri=0, seed=5, cxr_size=128, **COUNTS)
    assert [p.read_bytes() for p in again.pediatric_paths] == [p.read_bytes() for p in children.pediatric_paths]
    assert again.labels_csv.read_bytes() == children.labels_csv.read_bytes()


def test_cradle_synth_writes_children_films(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "cradle.cli", "synth", str(out), "--cxr", "0", "--mri", "0",
                          "--pediatric-cxr", "1", "--extremity", "2", "--hand", "1", "--seed", "3"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "4 children's films" in run.stdout
    assert sorted(p.parent.name for p in out.rglob("*.dcm")) == ["cxr", "extremity", "extremity", "hand"]


def test_cradle_synth_writes_six_of_each_children_film_by_default(tmp_path: Path) -> None:
    out = tmp_path / "defaults"
    run = subprocess.run([sys.executable, "-m", "cradle.cli", "synth", str(out), "--cxr", "0", "--mri", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "18 children's films" in run.stdout
    assert Counter(p.parent.name for p in out.rglob("*.dcm")) == {"cxr": 6, "extremity": 6, "hand": 6}
    with (out / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert Counter(r["pneumonia"] for r in rows if r["pneumonia"]) == {"normal": 2, "bacterial": 2, "viral": 2}
    assert Counter(r["fracture"] for r in rows if r["fracture"]) == {"0": 3, "1": 3}
    assert sum(1 for r in rows if r["bone_age_months"]) == 6
