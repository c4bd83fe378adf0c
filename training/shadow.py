"""``cradle models compare``: a version in shadow side by side with the active version, on the series
both ran on (the shadow job and the clinical job of the same series and pipeline, both done).

- classification (binary findings, the view): agreement of the calls (fraction, Cohen's kappa from
  scikit-learn) and the distribution of probability differences (shadow - active);
- segmentation: Dice between the two versions' masks (read back from their archived SEGs), per
  segment and per case, and the differences of the volumes they report;
- regression: mean absolute difference of the values;
- with labels imported for those studies (``cradle labels import``): each version's metrics against
  them and a paired test (DeLong for AUROC, as the training gate uses; Wilcoxon signed-rank on the
  absolute errors for regression).

Only job rows and archived results are read: the numbers carry row ids, never patient identifiers.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import dcmread
from scipy import stats
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from config.tasks import TaskDefinition
from storage.archive import Archive
from storage.models import Instance, Job, JobState, Series, StudyLabel
from training.evaluate import binary_metrics, delong_test, dice_iou

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MIN_PER_CLASS = 2
"""Labelled cases of each class DeLong's variance needs (with one, it is undefined)."""


class CompareError(ValueError):
    """Nothing to compare (unknown task or version kind); the message says why."""


@dataclass(frozen=True)
class Pair:
    """One series both versions ran on: the two jobs' rows and results."""

    series_pk: int
    study_pk: int
    active_job: int
    shadow_job: int
    active: dict[str, Any]
    shadow: dict[str, Any]


@dataclass
class Comparison:
    task: str
    kind: str
    version: str
    since: str | None
    runs: dict[str, int]
    active_versions: list[str] = field(default_factory=list)
    cases: int = 0
    agreement: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    labelled: dict[str, Any] | None = None
    series: dict[str, list[Any]] = field(default_factory=dict)
    """Per-case values behind the plots (row ids and numbers only)."""

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "kind": self.kind, "version": self.version, "since": self.since,
                "shadow_runs": self.runs, "active_versions": self.active_versions, "cases": self.cases,
                "agreement": self.agreement, **self.details, "labels": self.labelled}


# --- the index --------------------------------------------------------------------------------


def shadow_runs(session: Session, version: str, since: dt.datetime | None) -> dict[str, int]:
    """How the version's shadow jobs ended: state → count."""
    query = select(Job.state, func.count()).where(Job.shadow == version).group_by(Job.state)
    if since is not None:
        query = query.where(Job.created_at >= since)
    return {state.value: int(count) for state, count in session.execute(query)}


def pairs(session: Session, version: str, since: dt.datetime | None) -> list[Pair]:
    """The series where the shadow job of ``version`` and the clinical job are both done."""
    shadow, clinical = aliased(Job), aliased(Job)
    query = (select(shadow.series_pk, Series.study_pk, clinical.id, shadow.id, clinical.result, shadow.result)
             .join(clinical, (clinical.series_pk == shadow.series_pk) & (clinical.pipeline == shadow.pipeline)
                   & (clinical.shadow == ""))
             .join(Series, Series.id == shadow.series_pk)
             .where(shadow.shadow == version, shadow.state == JobState.done, clinical.state == JobState.done)
             .order_by(shadow.series_pk))
    if since is not None:
        query = query.where(shadow.finished_at >= since)
    return [Pair(*row[:4], row[4] or {}, row[5] or {}) for row in session.execute(query)]


def study_labels(session: Session, task: str, study_pks: Sequence[int]) -> dict[int, float]:
    if not study_pks:
        return {}
    rows = session.execute(select(StudyLabel.study_pk, StudyLabel.value)
                           .where(StudyLabel.task == task, StudyLabel.study_pk.in_(list(study_pks))))
    return {pk: float(value) for pk, value in rows}


# --- what each run said -----------------------------------------------------------------------


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return result.get("summary") or {}


def classification_call(task: TaskDefinition, result: dict[str, Any]) -> tuple[str, float, float] | None:
    """(call, probability, threshold) of a classification task in one run's summary; None when the
    run did not assess it (e.g. not a frontal chest film)."""
    summary = _summary(result)
    if task.role == "view":
        view = summary.get("view")
        if not view:
            return None
        return str(view["label"]), float(view["frontal_chest_probability"]), math.nan
    finding = (summary.get("findings") or {}).get(task.name)
    if not finding:
        return None
    return ("positive" if finding["positive"] else "negative", float(finding["probability"]),
            float(finding["threshold"]))


def regression_value(task: TaskDefinition, result: dict[str, Any]) -> float | None:
    finding = (_summary(result).get("findings") or {}).get(task.name) or {}
    value = finding.get("value")
    return None if value is None else float(value)


def model_of(task: TaskDefinition, result: dict[str, Any]) -> str:
    """The version of ``task`` behind a run (the finding's own model, else the run's tag)."""
    finding = (_summary(result).get("findings") or {}).get(task.name) or {}
    return str(finding.get("model") or result.get("model_version") or "")


# --- classification ---------------------------------------------------------------------------


def _distribution(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, "std": None, "median": None, "p05": None, "p95": None, "max_abs": None}
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "p05": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95)),
            "max_abs": float(np.abs(values).max())}


def _kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa; None when it is undefined (both versions gave one and the same call throughout)."""
    if not a or (len(set(a)) == 1 and set(a) == set(b)):
        return None
    value = float(cohen_kappa_score(a, b))
    return None if math.isnan(value) else value


def compare_classification(task: TaskDefinition, found: list[Pair], labels: dict[int, float],
                           out: Comparison) -> None:
    cases = [(p, a, s) for p in found
             if (a := classification_call(task, p.active)) is not None
             and (s := classification_call(task, p.shadow)) is not None]
    active_calls, shadow_calls = [a[0] for _, a, _ in cases], [s[0] for _, _, s in cases]
    differences = np.array([s[1] - a[1] for _, a, s in cases], dtype=float)
    out.cases = len(cases)
    out.agreement = float(np.mean([x == y for x, y in zip(active_calls, shadow_calls)])) if cases else None
    out.active_versions = sorted({model_of(task, p.active) for p, _, _ in cases})
    out.details = {"kappa": _kappa(active_calls, shadow_calls),
                   "disagreements": int(sum(x != y for x, y in zip(active_calls, shadow_calls))),
                   "probability_difference": _distribution(differences)}
    out.series = {"series_pk": [p.series_pk for p, _, _ in cases],
                  "active_probability": [a[1] for _, a, _ in cases],
                  "shadow_probability": [s[1] for _, _, s in cases]}
    if task.kind == "binary":
        out.labelled = binary_against_labels(cases, labels)


def binary_against_labels(cases: list[tuple[Pair, tuple, tuple]], labels: dict[int, float]) -> dict[str, Any] | None:
    """Each version's metrics on the labelled cases, at its own threshold, and DeLong's paired test."""
    labelled = [(labels[p.study_pk], a, s) for p, a, s in cases if p.study_pk in labels]
    if not labelled:
        return None
    y = np.array([int(v >= 0.5) for v, _, _ in labelled])
    active = np.array([a[1] for _, a, _ in labelled])
    shadow = np.array([s[1] for _, _, s in labelled])
    result: dict[str, Any] = {"cases": len(labelled),
                              "active": binary_metrics(y, active, labelled[0][1][2]),
                              "shadow": binary_metrics(y, shadow, labelled[0][2][2])}
    if min(y.sum(), len(y) - y.sum()) < MIN_PER_CLASS:
        result["paired_test"] = {"test": "DeLong", "not_done": f"needs at least {MIN_PER_CLASS} labelled cases "
                                                                f"of each class"}
    else:
        test = delong_test(y, shadow, active)
        result["paired_test"] = {"test": "DeLong (shadow vs active AUROC)", **test.as_dict()}
    return result


# --- regression -------------------------------------------------------------------------------


def compare_regression(task: TaskDefinition, found: list[Pair], labels: dict[int, float], out: Comparison) -> None:
    cases = [(p, a, s) for p in found
             if (a := regression_value(task, p.active)) is not None
             and (s := regression_value(task, p.shadow)) is not None]
    differences = np.array([s - a for _, a, s in cases], dtype=float)
    out.cases = len(cases)
    out.agreement = None
    out.active_versions = sorted({model_of(task, p.active) for p, _, _ in cases})
    out.details = {"mean_absolute_difference": float(np.abs(differences).mean()) if cases else None,
                   "difference": _distribution(differences)}
    out.series = {"series_pk": [p.series_pk for p, _, _ in cases], "active_value": [a for _, a, _ in cases],
                  "shadow_value": [s for _, _, s in cases]}
    labelled = [(labels[p.study_pk], a, s) for p, a, s in cases if p.study_pk in labels]
    if labelled:
        truth, active, shadow = (np.array(column, dtype=float) for column in zip(*labelled))
        errors_a, errors_s = np.abs(active - truth), np.abs(shadow - truth)
        paired: dict[str, Any] = {"test": "Wilcoxon signed-rank on absolute errors"}
        if np.any(errors_a != errors_s):
            paired["p_value"] = float(stats.wilcoxon(errors_s, errors_a).pvalue)
        out.labelled = {"cases": len(labelled), "active": {"mae": float(errors_a.mean())},
                        "shadow": {"mae": float(errors_s.mean())}, "paired_test": paired}


# --- segmentation -----------------------------------------------------------------------------


def segment_masks(path: Any) -> dict[int, np.ndarray]:
    """Segment number → its frames (a binary SEG written by cradle: one frame per source slice and
    segment, in the same order for every version)."""
    seg = dcmread(path)
    frames = np.asarray(seg.pixel_array).reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    numbers = [int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
               for item in seg.PerFrameFunctionalGroupsSequence]
    return {number: frames[[i for i, n in enumerate(numbers) if n == number]] > 0 for number in sorted(set(numbers))}


def _seg_path(session: Session, archive: Archive, result: dict[str, Any]) -> Any:
    uid = next((item["sop_uid"] for item in result.get("instances") or []
                if item.get("sop_class_uid") == SEG_STORAGE), None)
    if uid is None:
        return None
    file_path = session.scalar(select(Instance.file_path).where(Instance.sop_uid == uid))
    return None if file_path is None else archive.absolute(file_path)


def segmentation_dice(session: Session, archive: Archive, pair: Pair) -> dict[int, float] | None:
    """Dice per segment between the two runs' SEGs; None when either SEG is missing or they differ in
    layout."""
    paths = _seg_path(session, archive, pair.active), _seg_path(session, archive, pair.shadow)
    if None in paths:
        return None
    active, shadow = segment_masks(paths[0]), segment_masks(paths[1])
    if active.keys() != shadow.keys() or any(active[k].shape != shadow[k].shape for k in active):
        return None
    return {number: dice_iou(shadow[number], active[number])[0] for number in active}


def compare_segmentation(task: TaskDefinition, found: list[Pair], session: Session, archive: Archive,
                         out: Comparison) -> None:
    cases = [(p, d) for p in found if (d := segmentation_dice(session, archive, p)) is not None]
    per_case = np.array([np.mean(list(d.values())) for _, d in cases], dtype=float)
    volume_differences: dict[str, list[float]] = {}
    for pair, _ in cases:
        active = _summary(pair.active).get("volumes_ml") or {}
        shadow = _summary(pair.shadow).get("volumes_ml") or {}
        for name in active.keys() & shadow.keys():
            volume_differences.setdefault(name, []).append(float(shadow[name]) - float(active[name]))
    names = [output.meaning for output in task.outputs]
    out.cases = len(cases)
    out.agreement = float(per_case.mean()) if cases else None
    out.active_versions = sorted({model_of(task, p.active) for p, _ in cases})
    out.details = {
        "dice": _distribution(per_case),
        "dice_per_segment": {names[n - 1] if 0 < n <= len(names) else str(n):
                             float(np.mean([d[n] for _, d in cases])) for n in (cases[0][1] if cases else {})},
        "volume_difference_ml": {name: _distribution(np.array(values))
                                 for name, values in volume_differences.items()},
    }
    out.series = {"series_pk": [p.series_pk for p, _ in cases], "dice": per_case.tolist(),
                  "volume_difference_ml": volume_differences.get("total", [])}


# --- the whole comparison ---------------------------------------------------------------------


def compare(sessions: sessionmaker[Session], archive: Archive, task: TaskDefinition, version: str,
            since: dt.datetime | None = None) -> Comparison:
    """``version`` (in shadow, or shadowed before) against the active version(s) it ran beside."""
    with sessions() as session:
        out = Comparison(task=task.name, kind=task.kind, version=version,
                         since=since.isoformat() if since else None, runs=shadow_runs(session, version, since))
        found = pairs(session, version, since)
        labels = study_labels(session, task.name, sorted({p.study_pk for p in found}))
        if task.kind == "segmentation":
            compare_segmentation(task, found, session, archive, out)
        elif task.kind == "regression":
            compare_regression(task, found, labels, out)
        elif task.kind in ("binary", "multiclass"):
            compare_classification(task, found, labels, out)
        else:
            raise CompareError(f"no comparison for tasks of kind {task.kind!r}")
    return out
