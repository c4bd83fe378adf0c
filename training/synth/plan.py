"""Planning a synthetic archive: which patient gets which study, view and encoding.

Every random draw comes from a generator keyed by (seed, stream, index) (`stream_rng`), so
the same seed and counts give the same plan and the same pixels.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np

from training.synth.extremity import LIMB_SEGMENTS
from training.synth.patients import (PNEUMONIA_TYPES, SynthPatient, SynthStudy, child_weight_kg, make_adult,
                                     make_child, make_neonate, make_study)

VIEW_CLASSES: tuple[str, ...] = (
    "chest_frontal", "chest_lateral", "abdomen", "chest_abdomen", "head", "spine", "extremity",
)
# Views that `generate()` uses for its non-chest share, in the order it cycles through them.
GENERATED_VIEW_CLASSES: tuple[str, ...] = ("chest_lateral", "abdomen", "head", "chest_abdomen")
# The random streams of `stream_rng`: the plan, each patient, each radiograph, each MR study, each
# child's study and each child's film (their own streams: adding children changes no neonatal file).
STREAM_PLAN, STREAM_PATIENT, STREAM_CXR, STREAM_MR, STREAM_CHILD, STREAM_CHILD_FILM = 1, 2, 3, 4, 5, 6
PEDIATRIC_AGES: dict[str, tuple[float, float]] = {"chest": (1.0, 5.0), "extremity": (2.0, 16.0), "hand": (1.0, 17.0)}
"""Age range (years) of the children of each kind of pediatric film (the pneumonia paper's 1 to 5 years)."""


@dataclass(frozen=True)
class RadiographPlan:
    study: SynthStudy
    view_class: str
    modality: str
    photometric: str
    anatomy: str = "chest"  # "chest", "hand" or a key of LIMB_SEGMENTS


def stream_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _share_count(n: int, share: float, name: str) -> int:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {share}")
    return int(round(n * share))


def plan_radiographs(seed: int, n_cxr: int, adult_share: float, non_chest_share: float,
                     base: dt.datetime) -> list[RadiographPlan]:
    n_adult = _share_count(n_cxr, adult_share, "adult_share")
    n_other = _share_count(n_cxr, non_chest_share, "non_chest_share")
    if n_adult + n_other > n_cxr:
        raise ValueError("adult_share + non_chest_share exceed the number of radiographs")
    plan_rng = stream_rng(seed, STREAM_PLAN, 0)
    kinds = plan_rng.permutation(["adult"] * n_adult + ["other"] * n_other + ["neonate"] * (n_cxr - n_adult - n_other))
    combos = [("CR", "MONOCHROME1"), ("CR", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("DX", "MONOCHROME2")]
    encodings = plan_rng.permutation(np.arange(n_cxr) % 4)
    plans, n_other_seen = [], 0
    for i, kind in enumerate(kinds):
        index = i + 1
        rng = stream_rng(seed, STREAM_PATIENT, index)
        when = base + dt.timedelta(days=int(rng.integers(0, 180)), minutes=int(rng.integers(0, 24 * 60)))
        if kind == "adult":
            patient, view = make_adult(rng, index, when.date()), "chest_frontal"
        else:
            patient = make_neonate(rng, index, when.date() - dt.timedelta(days=1))
            view = "chest_frontal"
            if kind == "other":
                view = GENERATED_VIEW_CLASSES[n_other_seen % len(GENERATED_VIEW_CLASSES)]
                n_other_seen += 1
        weight = None if patient.is_neonate else round(float(rng.uniform(50, 110)), 1)
        study = make_study(patient, index, when, key=(seed, "radiograph", index), weight_kg=weight)
        modality, photometric = combos[int(encodings[i])]
        plans.append(RadiographPlan(study, view, modality, photometric))
    return plans


def plan_mr_studies(seed: int, n_mri: int, radiographs: list[RadiographPlan], base: dt.datetime) -> list[SynthStudy]:
    """Even-numbered MR studies go to babies who also had a chest radiograph."""
    frontal = [p.study for p in radiographs if p.view_class == "chest_frontal" and p.study.patient.is_neonate]
    studies = []
    for j in range(n_mri):
        rng = stream_rng(seed, STREAM_MR, j)
        index = len(radiographs) + j + 1
        if j % 2 == 0 and j // 2 < len(frontal):
            earlier = frontal[j // 2]
            patient = earlier.patient
            when = earlier.study_datetime + dt.timedelta(days=int(rng.integers(1, 21)), hours=int(rng.integers(1, 6)))
        else:
            when = base + dt.timedelta(days=int(rng.integers(0, 180)), minutes=int(rng.integers(0, 24 * 60)))
            patient = make_neonate(rng, index, when.date() - dt.timedelta(days=int(rng.integers(2, 22))))
        day_of_life = (when.date() - patient.birth_date).days
        weight = patient.birth_weight_g / 1000.0 * (1.0 + 0.012 * max(0, day_of_life - 10))
        studies.append(make_study(patient, index, when, key=(seed, "mr", j), weight_kg=weight))
    return studies


def _pediatric_patient(rng: np.random.Generator, kind: str, j: int, index: int, on: dt.date) -> SynthPatient:
    """A child with the label of its film: pneumonia type and fracture alternate, bone age near age."""
    if kind == "chest":
        return make_child(rng, index, on, PEDIATRIC_AGES[kind], pneumonia_type=PNEUMONIA_TYPES[j % 3])
    if kind == "extremity":
        return make_child(rng, index, on, PEDIATRIC_AGES[kind], fracture=j % 2)
    child = make_child(rng, index, on, PEDIATRIC_AGES[kind])
    age_months = (on - child.birth_date).days * 12 / 365.25
    bone_age = float(np.clip(age_months + rng.normal(0.0, 10.0), 6.0, 228.0))
    return dataclasses.replace(child, bone_age_months=round(bone_age, 1))


def plan_pediatric(seed: int, counts: dict[str, int], base: dt.datetime, first_index: int) -> list[RadiographPlan]:
    """Children's films: `counts` of pediatric frontal chests ("chest"), extremities and hands.

    Extremity films cycle through the limb segments, each with and without a fracture.
    """
    combos = [("CR", "MONOCHROME1"), ("CR", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("DX", "MONOCHROME2")]
    segments = list(LIMB_SEGMENTS)
    plans: list[RadiographPlan] = []
    for kind in ("chest", "extremity", "hand"):
        for j in range(counts.get(kind, 0)):
            index = first_index + len(plans)
            rng = stream_rng(seed, STREAM_CHILD, index)
            when = base + dt.timedelta(days=int(rng.integers(0, 180)), minutes=int(rng.integers(0, 24 * 60)))
            patient = _pediatric_patient(rng, kind, j, index, when.date())
            weight = child_weight_kg((when.date() - patient.birth_date).days)
            study = make_study(patient, index, when, key=(seed, kind, index), weight_kg=weight)
            modality, photometric = combos[int(rng.integers(0, 4))]
            view, anatomy = ("chest_frontal", "chest") if kind == "chest" else ("extremity", kind)
            if kind == "extremity":
                anatomy = segments[(j // 2) % len(segments)]
            plans.append(RadiographPlan(study, view, modality, photometric, anatomy))
    return plans
