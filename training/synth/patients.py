"""Synthetic patients and studies: identities, ground-truth labels, reproducible UIDs.

Neonates are NICU admissions (mostly preterm) and carry the label set (BPD, pneumonia, iRDS
grade) with a severity that drives the radiograph findings; children (1 to 17 years) carry the
pediatric labels of their film (pneumonia type, fracture, bone age); adults are mis-routed studies
without labels. Every UID derives from a key, so the same seed gives the same UIDs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

_UID_NAMESPACE = "cradle-synth-v1"


def synth_uid(*parts: object) -> str:
    """A UID derived only from `parts` (pydicom root + hash), so reruns reproduce it."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)])


@dataclass(frozen=True)
class SynthPatient:
    """Ground truth of one synthetic patient; neonates carry the label set."""

    patient_id: str
    patient_name: str
    birth_date: dt.date
    sex: str
    birth_weight_g: int | None
    gestational_age_weeks: float | None
    bpd: int | None = None
    pneumonia: int | None = None
    irds_grade: int | None = None
    bpd_severity: float = 0.0
    pneumonia_severity: float = 0.0
    child: bool = False
    pneumonia_type: str | None = None
    fracture: int | None = None
    bone_age_months: float | None = None

    @property
    def is_neonate(self) -> bool:
        return self.gestational_age_weeks is not None

    @property
    def is_adult(self) -> bool:
        return not self.is_neonate and not self.child


@dataclass(frozen=True)
class SynthStudy:
    """One study with one series (every synthetic study has exactly one)."""

    patient: SynthPatient
    study_instance_uid: str
    series_instance_uid: str
    study_id: str
    accession_number: str
    study_datetime: dt.datetime
    weight_kg: float

    @property
    def age_days(self) -> int:
        return (self.study_datetime.date() - self.patient.birth_date).days

    @property
    def patient_age(self) -> str:
        """Patient's Age (AS): days for the first 100 days, then months until 2 years, then years."""
        years = _whole_years(self.patient.birth_date, self.study_datetime.date())
        if years >= 2:
            return f"{years:03d}Y"
        if self.age_days < 100:
            return f"{self.age_days:03d}D"
        return f"{self.age_days * 12 // 365:03d}M"


def _whole_years(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


# Median birth weight (g) by gestational age (weeks), roughly Fenton 2013.
_GA_WEEKS = (22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42)
_GA_WEIGHT_G = (500, 650, 850, 1100, 1450, 1800, 2250, 2700, 3100, 3450, 3650)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def make_neonate(rng: np.random.Generator, index: int, birth_date: dt.date) -> SynthPatient:
    """A NICU admission: mostly preterm; BPD/iRDS more likely the more preterm."""
    preterm = rng.random() < 0.65
    ga_days = int(rng.integers(23 * 7, 32 * 7)) if preterm else int(rng.integers(32 * 7, 41 * 7))
    ga_weeks = ga_days / 7.0
    median_g = float(np.interp(ga_weeks, _GA_WEEKS, _GA_WEIGHT_G))
    birth_weight_g = int(np.clip(median_g * np.exp(rng.normal(0.0, 0.12)), 500, 4000))
    bpd = int(rng.random() < 0.3 + 0.3 * _sigmoid((29.5 - ga_weeks) / 1.5))
    pneumonia = int(rng.random() < 0.4)
    irds_mean = float(np.clip((33.0 - ga_weeks) / 3.0, 0.0, 3.0))
    irds_grade = int(np.clip(np.rint(irds_mean + rng.normal(0.0, 0.8)), 0, 4))
    return SynthPatient(
        patient_id=f"SYN{index:04d}",
        patient_name=f"SYNTH^BABY{index:04d}",
        birth_date=birth_date,
        sex=str(rng.choice(["M", "F"])),
        birth_weight_g=birth_weight_g,
        gestational_age_weeks=round(ga_weeks, 1),
        bpd=bpd,
        pneumonia=pneumonia,
        irds_grade=irds_grade,
        bpd_severity=float(rng.uniform(0.45, 1.0)) if bpd else 0.0,
        pneumonia_severity=float(rng.uniform(0.4, 1.0)) if pneumonia else 0.0,
    )


def make_adult(rng: np.random.Generator, index: int, on: dt.date) -> SynthPatient:
    """An adult who ended up in the neonatal feed (wrong routing): no labels."""
    years = int(rng.integers(18, 90))
    birth = dt.date(on.year - years, on.month, min(on.day, 28)) - dt.timedelta(days=int(rng.integers(1, 360)))
    return SynthPatient(
        patient_id=f"SYN{index:04d}",
        patient_name=f"SYNTH^ADULT{index:04d}",
        birth_date=birth,
        sex=str(rng.choice(["M", "F"])),
        birth_weight_g=None,
        gestational_age_weeks=None,
    )


PNEUMONIA_TYPES: tuple[str, ...] = ("normal", "bacterial", "viral")
"""The classes of the pediatric pneumonia labels (the pneumonia paper's data set)."""


def make_child(rng: np.random.Generator, index: int, on: dt.date, years: tuple[float, float],
               **labels: object) -> SynthPatient:
    """A child aged within `years` on `on`, carrying the pediatric `labels` of its film."""
    age_days = int(rng.uniform(*years) * 365.25)
    return SynthPatient(
        patient_id=f"SYN{index:04d}",
        patient_name=f"SYNTH^CHILD{index:04d}",
        birth_date=on - dt.timedelta(days=age_days),
        sex=str(rng.choice(["M", "F"])),
        birth_weight_g=None,
        gestational_age_weeks=None,
        child=True,
        **labels,  # type: ignore[arg-type]
    )


def child_weight_kg(age_days: int) -> float:
    """Median weight for age, roughly WHO/CDC: ~10 kg at 1 year, ~18 kg at 5, ~60 kg at 17."""
    return float(np.interp(age_days / 365.25, [1, 2, 5, 8, 12, 15, 17], [9.6, 12.2, 18.3, 25.5, 40, 55, 61]))


def make_study(
    patient: SynthPatient, index: int, when: dt.datetime, *, key: object, weight_kg: float | None = None
) -> SynthStudy:
    """Study/series identity for `patient`; UIDs derive from `key` only."""
    if weight_kg is None:
        weight_kg = (patient.birth_weight_g or 70000) / 1000.0
    return SynthStudy(
        patient=patient,
        study_instance_uid=synth_uid(key, "study"),
        series_instance_uid=synth_uid(key, "series"),
        study_id=f"S{index:04d}",
        accession_number=f"SYNA{index:06d}",
        study_datetime=when,
        weight_kg=round(weight_kg, 3),
    )


def random_neonatal_study(rng: np.random.Generator) -> SynthStudy:
    """For building blocks called without a study: a day-1 neonate with rng-derived UIDs."""
    key = int(rng.integers(1 << 62))
    index = int(rng.integers(1, 10000))
    when = dt.datetime(2024, 1, 1, 8, 0) + dt.timedelta(minutes=int(rng.integers(0, 365 * 24 * 60)))
    patient = make_neonate(rng, index, when.date() - dt.timedelta(days=1))
    return make_study(patient, index, when, key=("rng", key))
