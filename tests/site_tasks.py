"""A site's own tasks, one of each kind a site may add (config/tasks.yaml's layout), shared by the
tests of the catalogue, the CLI, labels import, the registry, the pipelines and training."""

from __future__ import annotations

from pathlib import Path

TOY = """
tasks:
  toy:
    kind: binary
    description: Toy finding
    pipeline: cxr
    role: finding
    labels: {source: csv, column: toy}
    population: {modalities: [CR, DX], body_parts: [CHEST, ""], views: [chest_frontal], max_age_days: 28}
    sr:
      concept: {value: "1234567", scheme: "99TOY", meaning: Toy finding concept}
    recipe: toy.yaml
"""
"""A binary finding on chest radiographs; its concept's meaning differs from its description so a
test can tell which one the SR shows where."""

SITE_TASKS = TOY + """
  toy-grade:
    kind: multiclass
    description: Toy grade
    pipeline: cxr
    role: finding
    classes: [none, mild, severe]
    labels: {source: csv, column: toy_grade, aliases: {moderate: mild, "grade 3": severe}}
    population: {modalities: [CR, DX]}
    sr:
      concept: {value: "1234568", scheme: "99TOY", meaning: Toy grade}
    recipe: toy.yaml
  toy-age:
    kind: regression
    description: Toy age
    pipeline: cxr
    role: finding
    labels: {source: csv, column: toy_age, range: [0, 240], units: months}
    population: {modalities: [CR, DX]}
    sr:
      concept: {value: "1234569", scheme: "99TOY", meaning: Toy age}
      units: {value: mo, scheme: UCUM, meaning: months}
    recipe: toy.yaml
"""
"""The toy finding plus a multiclass and a regression task."""


def write_site_tasks(directory: Path, text: str = SITE_TASKS) -> Path:
    path = directory / "tasks.yaml"
    path.write_text(text)
    return path
