"""Each radiograph task runs only on its population, and the SR says in words which did not and why.

Real pipelines on synthetic films of children (training.synth), with models whose answers are known in
advance (output biases, see test_pipelines.biased_state); every SR checked with dciodvfy and read back
with highdicom.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset

from config.settings import Settings, load_settings
from inference.pipelines import PipelineContext, get_pipeline
from inference.registry import ModelCache, ModelRegistry
from test_pipelines import BONE_AGE_OUTPUT, CXR_SPEC, VIEWS, _texts, _walk, dciodvfy_errors, register_active
from training.synth import make_cxr, make_study
from training.synth.extremity import make_extremity
from training.synth.hand import make_hand
from training.synth.patients import make_child

STUDY_DAY = dt.datetime(2026, 6, 1, 10, 30)


def child_film(kind: str, years: float, seed: int) -> Dataset:
    """A synthetic film of a child aged ``years`` on the study day: a frontal chest, a forearm or a hand."""
    rng = np.random.default_rng(seed)
    child = make_child(rng, seed, STUDY_DAY.date(), (years, years))
    study = make_study(child, seed, STUDY_DAY, key=("populations", kind, seed), weight_kg=15.0)
    if kind == "chest":
        return make_cxr(rng, study=study, size=256)
    if kind == "hand":
        return make_hand(rng, study=study, size=256)
    return make_extremity(rng, study=study, segment="forearm", size=256)


def _context(root: Path, view: str, **settings: object) -> PipelineContext:
    """A node whose view model calls every film ``view``, with every radiograph finding active."""
    config: Settings = load_settings(None, models_dir=str(root / "models"), **settings)
    context = PipelineContext(registry=ModelRegistry(config.models_dir, catalogue=config.catalogue()), device="cpu",
                              settings=config, models=ModelCache())
    register_active(context.registry, "view", "resnet18", {VIEWS.index(view): 6.0}, CXR_SPEC)
    register_active(context.registry, "bpd", "resnet18", 4.0, CXR_SPEC, threshold=0.4)
    register_active(context.registry, "pneumonia", "resnet18", {1: 4.0}, CXR_SPEC)
    register_active(context.registry, "fracture", "resnet18", 4.0, CXR_SPEC, threshold=0.5)
    register_active(context.registry, "bone-age", "resnet18", BONE_AGE_OUTPUT, CXR_SPEC)
    return context


@pytest.fixture(scope="module")
def chest_node(tmp_path_factory: pytest.TempPathFactory) -> PipelineContext:
    return _context(tmp_path_factory.mktemp("chest"), "chest_frontal")


@pytest.fixture(scope="module")
def extremity_node(tmp_path_factory: pytest.TempPathFactory) -> PipelineContext:
    return _context(tmp_path_factory.mktemp("extremity"), "extremity")


def _read_back(sr: Dataset, path: Path) -> hd.sr.Comprehensive3DSR:
    assert dciodvfy_errors(sr, path) == []
    return hd.sr.srread(path)


def _nums(report: Dataset) -> dict[str, tuple[float, str]]:
    """Each NUM's concept meaning → (value, unit code)."""
    return {str(item.ConceptNameCodeSequence[0].CodeMeaning): (
        float(item.MeasuredValueSequence[0].NumericValue),
        str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
        for item in _walk(report.ContentSequence) if item.ValueType == "NUM"}


def test_a_three_year_olds_chest_film_gets_pneumonia_by_type_and_view_and_no_bpd(
        chest_node: PipelineContext, tmp_path: Path) -> None:
    output = get_pipeline("cxr").run([child_film("chest", 3.2, 1)], chest_node)
    summary = output.summary
    assert summary["tasks_run"] == ["view", "pneumonia"]
    assert summary["tasks_not_run"] == {"bpd": "not applicable: older than 3 days",
                                        "fracture": "not applicable: another body part",
                                        "bone-age": "not applicable: another body part"}
    pneumonia = summary["findings"]["pneumonia"]
    assert pneumonia["call"] == "Bacterial pneumonia" and list(pneumonia["probabilities"]) == [
        "Normal", "Bacterial pneumonia", "Viral pneumonia"]
    assert sum(pneumonia["probabilities"].values()) == pytest.approx(1.0)
    report = _read_back(output.datasets[0], tmp_path / "sr.dcm")
    (call,) = [item for item in _walk(report.ContentSequence)
               if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "233604007"]
    assert call.ConceptCodeSequence[0].CodeValue == "53084003"  # the call: bacterial pneumonia
    nums = _nums(report)
    for meaning, probability in pneumonia["probabilities"].items():
        assert nums[meaning] == (pytest.approx(probability * 100, abs=1e-4), "%")
    assert _texts(report, "121106") == ["Moderate/severe BPD risk: not applicable (older than 3 days)",
                                        "Fracture: not applicable (another body part)",
                                        "Bone age: not applicable (another body part)"]
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_an_adolescents_chest_film_gets_the_view_only_each_decision_stated(
        chest_node: PipelineContext, tmp_path: Path) -> None:
    output = get_pipeline("cxr").run([child_film("chest", 12.0, 2)], chest_node)
    assert output.summary["tasks_run"] == ["view"] and output.summary["findings"] == {}
    assert output.summary["tasks_not_run"]["pneumonia"] == "not applicable: older than 6 years"
    report = _read_back(output.datasets[0], tmp_path / "sr.dcm")
    assert "Pneumonia: not applicable (older than 6 years)" in _texts(report, "121106")


def test_an_extremity_film_gets_fracture_with_a_region_a_viewer_draws(
        extremity_node: PipelineContext, tmp_path: Path) -> None:
    film = child_film("extremity", 8.0, 3)
    output = get_pipeline("cxr").run([film], extremity_node)
    summary = output.summary
    assert summary["tasks_run"] == ["view", "fracture"]
    assert summary["tasks_not_run"] == {"bpd": "not applicable: another body part",
                                        "pneumonia": "not applicable: another body part",
                                        "bone-age": "not applicable: another body part"}
    assert summary["findings"]["fracture"]["positive"] and summary["findings"]["fracture"]["region"]
    assert list(output.artefacts) == ["gradcam-fracture.png"]
    report = _read_back(output.datasets[0], tmp_path / "sr.dcm")
    (region,) = [item for item in _walk(report.ContentSequence) if item.ValueType == "SCOORD"]
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    assert len(points) >= 4 and np.array_equal(points[0], points[-1])
    assert points[:, 0].max() <= film.Columns and points[:, 1].max() <= film.Rows
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.finding_type.value for g in groups] == ["125605004"]
    procedures = [item.ConceptCodeSequence[0].CodeValue for item in _walk(report.ContentSequence)
                  if item.ConceptNameCodeSequence[0].CodeValue == "121058"]  # Procedure reported
    assert procedures == ["168537006"]  # plain radiography, not a chest X-ray


def test_a_hand_film_gets_bone_age_in_months_beside_the_chronological_age(
        extremity_node: PipelineContext, tmp_path: Path) -> None:
    film = child_film("hand", 7.5, 4)
    output = get_pipeline("cxr").run([film], extremity_node)
    assert output.summary["tasks_run"] == ["view", "fracture", "bone-age"]
    assert output.summary["findings"]["bone-age"] == {"estimated": True, "units": "mo", "beside": True,
                                                      "model": "bone-age-1"}
    report = _read_back(output.datasets[0], tmp_path / "sr.dcm")
    nums = _nums(report)
    value, unit = nums["Bone age"]
    assert unit == "mo" and value == pytest.approx(BONE_AGE_OUTPUT * 240, abs=2.0)
    age_days = (STUDY_DAY.date() - dt.datetime.strptime(film.PatientBirthDate, "%Y%m%d").date()).days
    assert nums["Age"] == (pytest.approx(age_days / (365.25 / 12), abs=0.05), "mo")
    (words,) = [text for text in _texts(report, "37362-1")]
    assert words == f"{value:.1f} months; age {nums['Age'][0]:.1f} months"
    identification = [str(item.TextValue) for item in _walk(report.ContentSequence)
                      if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert "cradle bone-age resnet18" in identification  # the algorithm's name (TID 4019)


def test_a_version_never_runs_outside_the_population_it_was_validated_on(tmp_path: Path) -> None:
    context = _context(tmp_path, "chest_frontal")
    from test_pipelines import biased_state

    narrow = context.registry.register("pneumonia", "resnet18", biased_state("pneumonia", "resnet18", {1: 4.0}),
                                       input_spec=CXR_SPEC, population={"min_age_days": 365, "max_age_days": 729})
    context.registry.activate("pneumonia", narrow.version, accept_unvalidated=True, reason="test weights")
    output = get_pipeline("cxr").run([child_film("chest", 3.0, 5)], context)
    assert output.summary["tasks_not_run"]["pneumonia"] == (
        "not applicable: outside what pneumonia-2 was validated on: older than 2 years")
    assert get_pipeline("cxr").run([child_film("chest", 1.5, 6)], context).summary["tasks_run"] == [
        "view", "pneumonia"]


def test_a_site_moves_a_tasks_age_window(tmp_path: Path) -> None:
    """``populations`` in the node's settings: BPD on films of the first week instead of the first 3 days."""
    context = _context(tmp_path, "chest_frontal", populations={"bpd": {"max_age_days": 7}})
    film = make_cxr(np.random.default_rng(7), size=256)
    birth = dt.datetime.strptime(film.StudyDate, "%Y%m%d").date() - dt.timedelta(days=6)
    film.PatientBirthDate = birth.strftime("%Y%m%d")
    assert get_pipeline("cxr").run([film], context).summary["tasks_run"] == ["view", "bpd"]
    shipped = _context(tmp_path / "shipped", "chest_frontal")
    assert get_pipeline("cxr").run([film], shipped).summary["tasks_not_run"]["bpd"] == (
        "not applicable: older than 3 days")


def test_a_yes_no_pneumonia_version_reports_a_probability_and_a_call(tmp_path: Path) -> None:
    """A site with pneumonia yes/no only keeps a binary model (``binary: true`` in its recipe): one output,
    registered with one class; the pipeline reports it as a binary finding with its region."""
    import torch

    from inference.models import create_model

    context = _context(tmp_path, "chest_frontal")
    torch.manual_seed(0)
    state = create_model("resnet18", "pneumonia", num_classes=1).state_dict()
    state["fc.weight"] = state["fc.weight"] * 0.01
    state["fc.bias"][0] = 4.0
    version = context.registry.register("pneumonia", "resnet18", state, input_spec=CXR_SPEC, classes=["Pneumonia"],
                                        threshold=0.5)
    context.registry.activate("pneumonia", version.version, accept_unvalidated=True, reason="test weights")
    output = get_pipeline("cxr").run([child_film("chest", 2.5, 8)], context)
    pneumonia = output.summary["findings"]["pneumonia"]
    assert pneumonia["positive"] and pneumonia["threshold"] == 0.5 and pneumonia["model"] == version.version
    report = _read_back(output.datasets[0], tmp_path / "sr.dcm")
    groups = report.content.get_planar_roi_measurement_groups()
    assert [g.finding_type.value for g in groups if g.finding_type is not None] == ["233604007"]
