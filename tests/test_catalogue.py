"""The task catalogue (config/tasks.yaml): loaded once per use, extended by a site's file, strict."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, RoutingRule, load_settings
from config.tasks import CatalogueError, load_catalogue
from site_tasks import TOY


def test_the_shipped_catalogue_defines_each_task_once() -> None:
    catalogue = load_catalogue()
    assert catalogue.names() == ("view", "bpd", "pneumonia", "lung-seg")
    assert [t.kind for t in catalogue] == ["multiclass", "binary", "binary", "segmentation"]
    assert [t.name for t in catalogue.findings("cxr")] == ["bpd", "pneumonia"]
    assert catalogue.view_task("cxr").name == "view" and catalogue.view_task("lung-mri") is None
    assert catalogue.with_label_column("bpd").name == "bpd" and catalogue.with_label_column("irds_grade") is None
    assert [o.meaning for o in catalogue.get("lung-seg").outputs] == ["Left lung", "Right lung"]
    with pytest.raises(KeyError, match="unknown task 'nope'; known: view, bpd, pneumonia, lung-seg"):
        catalogue.get("nope")


def test_default_routing_is_the_union_of_each_pipelines_populations() -> None:
    rules = load_settings(None).routing.rules
    assert rules == [
        RoutingRule(name="neonatal-chest-radiograph", pipelines=["cxr"], modalities=["CR", "DX"],
                    body_parts=["CHEST", ""], max_age_days=28),
        RoutingRule(name="neonatal-chest-mri", pipelines=["lung-mri"], modalities=["MR"],
                    body_parts=["CHEST", "THORAX", "LUNG", ""], max_age_days=28)]


def test_a_site_file_adds_tasks(tmp_path: Path) -> None:
    site = tmp_path / "tasks.yaml"
    site.write_text(TOY)
    config = tmp_path / "cradle.yaml"
    config.write_text(f"task_catalogue: {site}\n")
    catalogue = load_settings(config).catalogue()
    assert catalogue.names() == ("view", "bpd", "pneumonia", "lung-seg", "toy")
    assert [t.name for t in catalogue.findings("cxr")] == ["bpd", "pneumonia", "toy"]
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
    ({"modality": "dx", "body_part": "", "view": "chest_frontal", "age_days": 28}, ""),
    ({"modality": "MR", "body_part": "CHEST", "view": "chest_frontal", "age_days": 1}, "another modality"),
    ({"modality": "CR", "body_part": "HAND", "view": "chest_frontal", "age_days": 1}, "another body part"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_lateral", "age_days": 1}, "not a frontal chest film"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_frontal", "age_days": None}, "patient age unknown"),
    ({"modality": "CR", "body_part": "CHEST", "view": "chest_frontal", "age_days": 29}, "older than 28 days"),
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
