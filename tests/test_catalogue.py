"""The task catalogue (config/tasks.yaml): loaded once per use, extended by a site's file, strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, RoutingRule, load_settings
from config.tasks import CatalogueError, load_catalogue
from site_tasks import TOY


def test_the_shipped_catalogue_defines_each_task_once() -> None:
    catalogue = load_catalogue()
    assert catalogue.names() == ("view", "bpd", "pneumonia", "fracture", "bone-age", "lung-seg")
    assert [t.kind for t in catalogue] == ["multiclass", "binary", "multiclass", "binary", "regression",
                                           "segmentation"]
    assert [t.name for t in catalogue.findings("cxr")] == ["bpd", "pneumonia", "fracture", "bone-age"]
    assert catalogue.get("pneumonia").classes == ["normal", "bacterial", "viral"]
    assert [c.meaning for c in catalogue.get("pneumonia").sr.classes.values()] == [
        "Normal", "Bacterial pneumonia", "Viral pneumonia"]
    bone_age = catalogue.get("bone-age")
    assert (bone_age.sr.concept.value, bone_age.sr.units.value, bone_age.labels.units) == ("37362-1", "mo", "months")
    assert catalogue.view_task("cxr").name == "view" and catalogue.view_task("lung-mri") is None
    assert catalogue.with_label_column("bpd").name == "bpd" and catalogue.with_label_column("irds_grade") is None
    assert [o.meaning for o in catalogue.get("lung-seg").outputs] == ["Left lung", "Right lung"]
    with pytest.raises(KeyError, match="unknown task 'nope'; known: view, bpd, pneumonia, fracture, bone-age, lung-seg"):
        catalogue.get("nope")


def test_default_routing_is_the_union_of_each_pipelines_populations() -> None:
    rules = load_settings(None).routing.rules
    assert rules == [  # every radiograph of a child: the view task's population, the widest of the cxr tasks'
        RoutingRule(name="pediatric-radiograph", pipelines=["cxr"], modalities=["CR", "DX"], max_age_days=6570),
        RoutingRule(name="neonatal-chest-mri", pipelines=["lung-mri"], modalities=["MR"],
                    body_parts=["CHEST", "THORAX", "LUNG", ""], max_age_days=28)]


def test_a_site_file_adds_tasks(tmp_path: Path) -> None:
    site = tmp_path / "tasks.yaml"
    site.write_text(TOY)
    config = tmp_path / "cradle.yaml"
    config.write_text(f"task_catalogue: {site}\n")
    catalogue = load_settings(config).catalogue()
    assert catalogue.names() == ("view", "bpd", "pneumonia", "fracture", "bone-age", "lung-seg", "toy")
    assert [t.name for t in catalogue.findings("cxr")] == ["bpd", "pneumonia", "fracture", "bone-age", "toy"]
    assert catalogue.get("toy").sr.concept.meaning == "Toy finding concept"


@pytest.mark.parametrize(("text", "reason"), [
    (TOY.replace("toy:\n", "bpd:\n"), "tasks bpd already defined by cradle"),
    (TOY.replace("kind: binary", "kind: ordinal"), "tasks.toy.kind: Input should be 'binary'"),
    (TOY.replace("kind: binary", "kind: multiclass"), "a multiclass task needs classes"),
    (TOY.replace("pipeline: cxr", "pipeline: ct"), "task toy: unknown pipeline 'ct'"),
    (TOY.replace("{source: csv, column: toy}", "{source: csv}"), "labels.column is required for source csv"),
    (TOY.replace("kind: binary", "kind: regression"), "a regression task needs labels.range and sr.units"),
    ("tasks: [toy]\n", "'tasks' maps each task's name to its definition"),
])
def test_a_bad_site_file_is_a_config_error_naming_the_task(tmp_path: Path, text: str, reason: str) -> None:
    site = tmp_path / "tasks.yaml"
    site.write_text(text)
    with pytest.raises(CatalogueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_catalogue(site)
    config = tmp_path / "cradle.yaml"
    config.write_text(f"task_catalogue: {site}\n")
    with pytest.raises(ConfigError, match="task_catalogue"):
        load_settings(config)


@pytest.mark.parametrize(("facts", "reason"), [
    ({"modality": "DX", "body_part": "CHEST", "view": "chest_frontal", "age_days": 1}, ""),
    ({"modality": "dx", "body_part": "", "view": "chest_frontal", "age_days": 3}, ""),
    ({"modality": "MR", "body_part": "CHEST", "view": "chest_frontal", "age_days": 1}, "another modality"),
    ({"modality": "CR", "body_part": "HAND", "view": "chest_frontal", "age_days": 1}, "another body part"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_lateral", "age_days": 1}, "not a frontal chest film"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_frontal", "age_days": None}, "patient age unknown"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_frontal", "age_days": 4}, "older than 3 days"),
])
def test_a_population_says_why_a_series_is_outside_it_without_the_age(facts: dict, reason: str) -> None:
    assert load_catalogue().get("bpd").population.mismatch(**facts) == reason


def test_age_bounds_read_in_years_and_days() -> None:
    from config.tasks import Population
    children = Population(min_age_days=365, max_age_days=6 * 365 - 1)
    facts = {"modality": "DX", "body_part": "CHEST", "view": None}
    assert children.mismatch(**facts, age_days=364) == "younger than 1 year"
    assert children.mismatch(**facts, age_days=6 * 365) == "older than 6 years"
    assert children.mismatch(**facts, age_days=3 * 365) == ""


@pytest.mark.parametrize(("task", "facts", "reason"), [
    ("pneumonia", {"body_part": "CHEST", "view": "chest_frontal", "age_days": 3 * 365}, ""),
    ("pneumonia", {"body_part": "CHEST", "view": "chest_frontal", "age_days": 1}, "younger than 1 year"),
    ("pneumonia", {"body_part": "CHEST", "view": "chest_frontal", "age_days": 7 * 365}, "older than 6 years"),
    ("fracture", {"body_part": "FOREARM", "view": "extremity", "age_days": 8 * 365}, ""),
    ("fracture", {"body_part": "FOREARM", "view": "chest_frontal", "age_days": 8 * 365}, "not an extremity film"),
    ("fracture", {"body_part": "FOREARM", "view": "extremity", "age_days": 30 * 365}, "older than 18 years"),
    ("bone-age", {"body_part": "HAND", "view": "extremity", "age_days": 8 * 365}, ""),
    ("bone-age", {"body_part": "FOREARM", "view": "extremity", "age_days": 8 * 365}, "another body part"),
    ("view", {"body_part": "SKULL", "view": None, "age_days": 30}, ""),
    ("view", {"body_part": "CHEST", "view": None, "age_days": 40 * 365}, "older than 18 years"),
])
def test_each_radiograph_task_has_the_population_of_its_paper(task: str, facts: dict, reason: str) -> None:
    assert load_catalogue().get(task).population.mismatch(modality="DX", **facts) == reason


def test_a_site_overrides_only_the_keys_it_gives_and_only_of_known_tasks(tmp_path: Path) -> None:
    config = tmp_path / "cradle.yaml"
    config.write_text("populations:\n  bpd: {max_age_days: 7}\n")
    bpd = load_settings(config).catalogue().get("bpd").population
    assert (bpd.max_age_days, bpd.views, bpd.body_parts) == (7, ["chest_frontal"], ["CHEST", ""])
    config.write_text("populations:\n  bpdd: {max_age_days: 7}\n")
    with pytest.raises(ConfigError, match="unknown task 'bpdd'"):
        load_settings(config)
    config.write_text("populations:\n  bpd: {max_age: 7}\n")
    with pytest.raises(ConfigError, match="max_age"):
        load_settings(config)
