"""Radiographic view taxonomies (``config/views.yaml``) and the header rules that label films with
them (``config/view_rules.yaml``): one parser for the view model's classes (inference) and for the
labels it is trained on (training).

A taxonomy has its classes (in the view model's output order), each known class's 7-class parent
(the finer ``views30`` classes included, so a rule written with a fine class folds into ``views7``),
its frontal chest classes, and the header rules. Torch-free; the files are read as package data
(:mod:`importlib.resources`), or from the paths given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

__all__ = [
    "FRONTAL_CHEST",
    "VIEWS_FILE",
    "VIEW_RULES_FILE",
    "ViewHeader",
    "ViewRule",
    "ViewTaxonomy",
    "frontal_chest_classes",
    "load_view_taxonomy",
    "view_taxonomies",
]

VIEWS_FILE = "views.yaml"
VIEW_RULES_FILE = "view_rules.yaml"
FRONTAL_CHEST = "chest_frontal"
"""The 7-class parent of every frontal chest class."""


@dataclass(frozen=True)
class ViewHeader:
    """What the header rules look at in an image's DICOM header."""

    modality: str
    body_part: str = ""
    view_position: str = ""
    series_description: str = ""
    protocol_name: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class ViewRule:
    """One rule of ``view_rules.yaml``: the class of an image whose header matches every condition."""

    label: str
    body_parts: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    description: re.Pattern[str] | None = None
    modalities: frozenset[str] = frozenset({"CR", "DX"})

    def matches(self, header: ViewHeader) -> bool:
        if self.modalities and header.modality.upper() not in self.modalities:
            return False
        if self.body_parts and header.body_part.upper().replace(" ", "_") not in self.body_parts:
            return False
        if self.view_positions and header.view_position.upper() not in self.view_positions:
            return False
        text = " ".join((header.series_description, header.protocol_name, header.study_description))
        return self.description is None or bool(self.description.search(text))


@dataclass(frozen=True)
class ViewTaxonomy:
    """A taxonomy's classes, each known class's 7-class parent, its frontal chest classes and the
    header rules."""

    name: str
    classes: tuple[str, ...]
    parents: dict[str, str]
    frontal_chest: frozenset[str]
    rules: tuple[ViewRule, ...] = ()

    def label_of(self, header: ViewHeader) -> str | None:
        """The class of an image from its header, or None when no rule matches."""
        for rule in self.rules:
            if rule.matches(header):
                return rule.label if rule.label in self.classes else self.parents.get(rule.label)
        return None


def _read(name: str, path: Path | None) -> dict:
    text = Path(path).read_text() if path is not None else resources.files("config").joinpath(name).read_text()
    return yaml.safe_load(text)


def _rule(entry: dict) -> ViewRule:
    upper = lambda items: frozenset(str(i).upper().replace(" ", "_") for i in items or [])  # noqa: E731
    pattern = entry.get("description")
    return ViewRule(label=entry["class"], body_parts=upper(entry.get("body_parts")),
                    view_positions=upper(entry.get("view_positions")),
                    description=re.compile(pattern, re.IGNORECASE) if pattern else None,
                    modalities=upper(entry.get("modalities", ["CR", "DX"])))


def view_taxonomies(*, views_file: Path | None = None, rules_file: Path | None = None) -> dict[str, ViewTaxonomy]:
    """Every taxonomy of the views file, by name (with the header rules)."""
    document = _read(VIEWS_FILE, views_file)
    rules = tuple(_rule(r) for r in _read(VIEW_RULES_FILE, rules_file)["rules"])
    fine = dict(document["taxonomies"].get("views30", {}).get("classes", {}))
    taxonomies = {}
    for name, entry in document["taxonomies"].items():
        classes = dict(entry["classes"])
        taxonomies[name] = ViewTaxonomy(name, tuple(classes), {**fine, **classes},
                                        frozenset(entry["frontal_chest"]), rules)
    return taxonomies


def load_view_taxonomy(name: str | None = None, *, views_file: Path | None = None,
                       rules_file: Path | None = None) -> ViewTaxonomy:
    """The named taxonomy (default: the views file's ``default``, the 7 classes)."""
    name = name or _read(VIEWS_FILE, views_file).get("default", "views7")
    taxonomies = view_taxonomies(views_file=views_file, rules_file=rules_file)
    if name not in taxonomies:
        raise ValueError(f"unknown view taxonomy {name!r}; known: {', '.join(taxonomies)}")
    return taxonomies[name]


def frontal_chest_classes(classes: Sequence[str], *, views_file: Path | None = None) -> frozenset[str]:
    """The classes of a view model that mean "frontal chest film", whichever taxonomy they come from."""
    frontal = {FRONTAL_CHEST}
    for taxonomy in view_taxonomies(views_file=views_file).values():
        frontal |= taxonomy.frontal_chest
        frontal |= {c for c, parent in taxonomy.parents.items() if parent == FRONTAL_CHEST}
    return frozenset(c for c in classes if c in frontal)
