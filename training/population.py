"""The population a training run draws from, and the population it actually saw.

A task is meant for a population (``config/tasks.yaml``, narrowed by a site's ``populations:``): its
modalities, body parts, views and an age window in days. Training takes only the films inside it
(and, for a task labelled from a csv column, inside the recipe's ``views`` too), counts those left out
by reason, and registers the version with what its data really held: the modalities, body parts and
views seen and the youngest and oldest age seen. Inference never runs a version outside that, so a
version trained only on 2- to 4-year-olds is not run on a 5-year-old although the task would allow it.

Counts only leave this module: an age is never logged (beside a study date it gives the birth date).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from config.tasks import Population
from node.routing import age_in_days

OUTSIDE = "outside the population"
"""The prefix of every ``Collection.skipped`` reason that is a population check."""


def training_population(population: Population, recipe_views: Sequence[str], *, csv_labelled: bool) -> Population:
    """The population a run takes films from: the task's, its views narrowed to the recipe's ``views``
    for a csv-labelled task (never widened: a view outside the task's population is an error)."""
    if not csv_labelled or not recipe_views:
        return population
    if not population.views:
        return population.model_copy(update={"views": list(recipe_views)})
    views = [v for v in recipe_views if v in population.views]
    if not views:
        raise ValueError(f"the recipe's views {list(recipe_views)} are outside the task's population "
                         f"(views {population.views})")
    return population.model_copy(update={"views": views})


def age_days(birth_date: dt.date | None, study_date: dt.date | None, acquired: dt.datetime | None,
             patient_age: str) -> int | None:
    """The patient's age in days at the study (the routing's rule: dates first, then Patient's Age)."""
    when = study_date or (acquired.date() if acquired else None)
    return age_in_days(birth_date, when, patient_age)


def outside(population: Population, *, modality: str, body_part: str, view: str | None,
            age: int | None) -> str:
    """``""`` when inside ``population``, else the ``Collection.skipped`` reason (names the bound, not the age)."""
    reason = population.mismatch(modality=modality or "", body_part=body_part or "", view=view, age_days=age)
    return f"{OUTSIDE}: {reason}" if reason else ""


@dataclass
class Seen:
    """What a run's films were, accumulated film by film."""

    modalities: set[str] = field(default_factory=set)
    body_parts: set[str] = field(default_factory=set)
    views: set[str] = field(default_factory=set)
    youngest: int | None = None
    oldest: int | None = None

    def add(self, *, modality: str, body_part: str, view: str | None, age: int | None) -> None:
        self.modalities.add((modality or "").upper())
        self.body_parts.add((body_part or "").strip().upper())
        if view:
            self.views.add(view)
        if age is not None:
            self.youngest = age if self.youngest is None else min(self.youngest, age)
            self.oldest = age if self.oldest is None else max(self.oldest, age)

    def as_population(self) -> dict[str, Any]:
        """``config.tasks.Population``'s keys, what the registry keeps with the version."""
        return {"modalities": sorted(self.modalities), "body_parts": sorted(self.body_parts),
                "views": sorted(self.views), "min_age_days": self.youngest, "max_age_days": self.oldest}


def left_out(skipped: Counter) -> dict[str, Any]:
    """The films a run left out, for the summary and the report: the total outside the population and
    every reason with its count."""
    return {"outside_population": sum(n for reason, n in skipped.items() if reason.startswith(OUTSIDE)),
            "by_reason": dict(sorted(skipped.items()))}
