"""The task catalogue: each task cradle knows, defined once (``config/tasks.yaml``).

A task has a name, a kind (binary, multiclass, regression, segmentation), its classes or outputs,
where its training labels come from and which values they accept, the population it is meant for,
how its result is coded in the SR, and its default training recipe. Everything else reads it:
``cradle train``'s choices, recipe validation, model heads, labels import, the registry, default
routing, the pipelines and the SR writers. A site adds tasks of an existing kind in its own file
(``task_catalogue`` in the node's settings), new names only.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Kind = Literal["binary", "multiclass", "regression", "segmentation"]
Role = Literal["view", "finding", "segmentation"]
SHIPPED = "tasks.yaml"


class CatalogueError(ValueError):
    """A catalogue file is invalid; the message names the file, the task and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(Strict):
    """A coded concept (SR / SEG): code value, coding scheme designator, code meaning."""

    value: str
    scheme: str
    meaning: str


class LabelSpec(Strict):
    """Where a task's training labels come from, and for ``csv`` the column and accepted values."""

    source: Literal["csv", "headers", "seg"]
    column: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict, description="multiclass: text -> class")
    range: tuple[float, float] | None = Field(None, description="regression: plausible values")
    units: str | None = Field(None, description="regression: units of the column (e.g. months)")
    yes_no: bool = Field(False, description="multiclass: also 0/1 (0: the first class, 1: any other)")

    @model_validator(mode="after")
    def _column_for_csv(self) -> "LabelSpec":
        if (self.source == "csv") != (self.column is not None):
            raise ValueError("labels.column is required for source csv and only for it")
        return self


YES_NO_POSITIVE = -1.0
"""How a ``yes_no`` multiclass column stores "1" (some class other than the first, not said which): a
binary recipe learns it as positive, a multiclass one leaves it out."""


class Population(Strict):
    """The series a task is meant for. Empty lists match anything; ``""`` in body_parts matches a
    series that does not say."""

    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    views: list[str] = Field(default_factory=list)
    min_age_days: int | None = Field(None, ge=0)
    max_age_days: int | None = Field(None, ge=0)

    def mismatch(self, *, modality: str, body_part: str, view: str | None, age_days: int | None) -> str:
        """Why a series is outside the population ("" when inside). The reason names the bound, never
        the age: it reaches logs and the SR, and an age beside a date gives the birth date."""
        if self.modalities and modality.upper() not in {m.upper() for m in self.modalities}:
            return "another modality"
        if self.body_parts and body_part.strip().upper() not in {b.upper() for b in self.body_parts}:
            return "another body part"
        if self.views and view not in self.views:
            views = " or ".join(_view_in_words(v) for v in self.views)
            return f"not {'an' if views[0] in 'aeiou' else 'a'} {views} film"
        if self.min_age_days is None and self.max_age_days is None:
            return ""
        if age_days is None:
            return "patient age unknown"
        if self.max_age_days is not None and age_days > self.max_age_days:
            return f"older than {_days_in_words(self.max_age_days)}"
        if self.min_age_days is not None and age_days < self.min_age_days:
            return f"younger than {_days_in_words(self.min_age_days)}"
        return ""


class PopulationOverride(Strict):
    """A site's change to a task's population (``populations:`` in the node's settings): only the keys
    given (not null) replace the catalogue's."""

    modalities: list[str] | None = None
    body_parts: list[str] | None = None
    views: list[str] | None = None
    min_age_days: int | None = Field(None, ge=0)
    max_age_days: int | None = Field(None, ge=0)


class SrCoding(Strict):
    concept: CodeSpec
    units: CodeSpec | None = None
    classes: dict[str, CodeSpec] = Field(default_factory=dict, description="multiclass: each class's code")
    beside: CodeSpec | None = Field(None, description="regression: the concept of the value it is read "
                                                      "beside (bone age: the chronological age)")


class TaskDefinition(Strict):
    name: str
    kind: Kind
    description: str
    pipeline: str
    role: Role
    classes: list[str] | Literal["taxonomy"] | None = None
    outputs: list[CodeSpec] = Field(default_factory=list)
    labels: LabelSpec
    population: Population
    sr: SrCoding
    recipe: str
    image_size: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _fits_its_kind(self) -> "TaskDefinition":
        if self.kind == "multiclass" and not self.classes:
            raise ValueError("a multiclass task needs classes (a list, or taxonomy)")
        if self.kind != "multiclass" and self.classes is not None:
            raise ValueError(f"a {self.kind} task has no classes")
        if (self.kind == "segmentation") != bool(self.outputs):
            raise ValueError("outputs are required for a segmentation task and only for it")
        if (self.kind == "segmentation") != (self.role == "segmentation"):
            raise ValueError("role segmentation is for segmentation tasks only")
        if self.kind == "regression" and (self.labels.range is None or self.sr.units is None):
            raise ValueError("a regression task needs labels.range and sr.units")
        if self.sr.classes and (self.kind != "multiclass" or not isinstance(self.classes, list)
                                or set(self.sr.classes) != set(self.classes)):
            raise ValueError("sr.classes codes every class of a multiclass task with a class list, no other")
        if self.labels.yes_no and self.kind != "multiclass":
            raise ValueError("labels.yes_no is for a multiclass task")
        return self

    def narrowed(self, override: "PopulationOverride | None") -> "TaskDefinition":
        """This task with a site's population override applied (the age window, views, body parts)."""
        if override is None:
            return self
        changes = override.model_dump(exclude_none=True)
        return self.model_copy(update={"population": self.population.model_copy(update=changes)})

    @property
    def finding(self) -> bool:
        return self.role == "finding"

    def value_of(self, output: Any) -> Any:
        """A regression model's output (0 to 1 across ``labels.range``) in the label's units."""
        low, high = self._range()
        return low + (high - low) * output

    def output_of(self, value: Any) -> Any:
        """The inverse of :meth:`value_of`: what the model is trained to output for ``value``."""
        low, high = self._range()
        return (value - low) / (high - low)

    def _range(self) -> tuple[float, float]:
        if self.labels.range is None:
            raise ValueError(f"{self.name} is not a regression task")
        return self.labels.range


class PipelineDefinition(Strict):
    routing_rule: str = Field(description="the name of the default routing rule sending series to it")


class TaskCatalogue(Strict):
    pipelines: dict[str, PipelineDefinition]
    tasks: dict[str, TaskDefinition]

    def __iter__(self) -> Iterator[TaskDefinition]:  # type: ignore[override]
        return iter(self.tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self.tasks

    def names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def get(self, name: str) -> TaskDefinition:
        """The task called ``name``; a KeyError naming the known tasks otherwise."""
        try:
            return self.tasks[name]
        except KeyError:
            raise KeyError(f"unknown task {name!r}; known: {', '.join(self.tasks)}") from None

    def with_populations(self, overrides: dict[str, PopulationOverride]) -> "TaskCatalogue":
        """This catalogue with a site's population overrides applied; a KeyError names an unknown task."""
        for name in overrides:
            self.get(name)
        if not overrides:
            return self
        tasks = {name: task.narrowed(overrides.get(name)) for name, task in self.tasks.items()}
        return self.model_copy(update={"tasks": tasks})

    def of_pipeline(self, pipeline: str) -> list[TaskDefinition]:
        return [task for task in self if task.pipeline == pipeline]

    def findings(self, pipeline: str) -> list[TaskDefinition]:
        """The finding tasks a pipeline runs, in catalogue order."""
        return [task for task in self.of_pipeline(pipeline) if task.finding]

    def view_task(self, pipeline: str) -> TaskDefinition | None:
        return next((task for task in self.of_pipeline(pipeline) if task.role == "view"), None)

    def with_label_column(self, column: str) -> TaskDefinition | None:
        return next((t for t in self if t.labels.source == "csv" and t.labels.column == column), None)

    def routing_population(self, pipeline: str) -> Population:
        """What the default routing rule of ``pipeline`` admits: the union of its tasks'
        populations (any view: the view task decides per film)."""
        tasks = self.of_pipeline(pipeline)
        mins = [t.population.min_age_days for t in tasks]
        maxs = [t.population.max_age_days for t in tasks]
        return Population(
            modalities=_union(t.population.modalities for t in tasks),
            body_parts=_union(t.population.body_parts for t in tasks),
            min_age_days=None if None in mins else min(mins),
            max_age_days=None if None in maxs else max(maxs))

    @model_validator(mode="after")
    def _pipelines_known(self) -> "TaskCatalogue":
        for task in self.tasks.values():
            if task.pipeline not in self.pipelines:
                raise ValueError(f"task {task.name}: unknown pipeline {task.pipeline!r}")
        return self


def _view_in_words(view: str) -> str:
    """``chest_frontal`` → "frontal chest", ``extremity`` → "extremity"."""
    return " ".join(reversed(view.split("_")))


def _days_in_words(days: int) -> str:
    """An age bound as a reader says it: 3 days, 28 days, 1 year, 6 years (whole years from 365 days)."""
    if days >= 365 and days % 365 in (0, 364):
        years = round(days / 365)
        return f"{years} year{'s' if years != 1 else ''}"
    return f"{days} day{'s' if days != 1 else ''}"


def _union(lists: Iterator[list[str]]) -> list[str]:
    """Any list empty (= anything) makes the union anything; otherwise the values in first-seen order."""
    merged: list[str] = []
    for values in lists:
        if not values:
            return []
        merged.extend(v for v in values if v not in merged)
    return merged


def _read(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not set(data) <= {"pipelines", "tasks"}:
        raise CatalogueError(f"{origin}: the top level has only 'pipelines' and 'tasks'")
    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise CatalogueError(f"{origin}: 'tasks' maps each task's name to its definition")
    return {"pipelines": data.get("pipelines") or {},
            "tasks": {name: {**body, "name": name} for name, body in tasks.items()}}


def _merge(shipped: dict, site: dict, origin: str) -> dict:
    for section in ("pipelines", "tasks"):
        clash = sorted(set(shipped[section]) & set(site[section]))
        if clash:
            raise CatalogueError(f"{origin}: {section} {', '.join(clash)} already defined by cradle")
    return {section: {**shipped[section], **site[section]} for section in ("pipelines", "tasks")}


def _validate(data: dict, origin: str) -> TaskCatalogue:
    try:
        return TaskCatalogue.model_validate(data)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CatalogueError(f"{origin}: {where}") from None


def load_catalogue(site_file: str | Path | None = None) -> TaskCatalogue:
    """The shipped catalogue, plus the tasks of ``site_file`` when given (new names only)."""
    shipped_text = resources.files("config").joinpath(SHIPPED).read_text()
    data = _read(shipped_text, SHIPPED)
    origin = SHIPPED
    if site_file is not None:
        origin = str(site_file)
        try:
            site_text = Path(site_file).read_text()
        except OSError as exc:
            raise CatalogueError(f"{site_file}: {exc.strerror or exc}") from None
        data = _merge(data, _read(site_text, origin), origin)
    return _validate(data, origin)

