"""Metrics for a training run: discrimination, calibration, operating point, overlap.

Binary tasks: AUROC, balanced accuracy, F1, sensitivity, specificity, PPV, NPV (sklearn.metrics),
a bootstrap confidence interval, DeLong's test for two correlated ROC curves (the fast algorithm of
Sun & Xu, IEEE SPL 2014), expected calibration error with a reliability table, temperature scaling,
and the threshold that reaches a target sensitivity. Segmentation: Dice and IoU per slice and per
volume. Regression: MAE, RMSE and R² (sklearn.metrics), Bland-Altman agreement and a paired
Wilcoxon signed-rank test on absolute errors. Everything is plain numpy in and plain floats out, so reports serialise as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats
from sklearn import metrics

Array = np.ndarray


def sigmoid(logits: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def softmax(logits: Array) -> Array:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --- binary classification -------------------------------------------------------------------

def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def auroc(y_true: Array, scores: Array) -> float:
    """Area under the ROC curve; NaN when the labels hold a single class."""
    y = np.asarray(y_true)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(metrics.roc_auc_score(y, scores))


def binary_metrics(y_true: Array, probabilities: Array, threshold: float = 0.5) -> dict[str, float]:
    """AUROC and the confusion-matrix metrics at ``threshold``."""
    y = np.asarray(y_true).astype(int)
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    tn, fp, fn, tp = metrics.confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    sensitivity = _safe_ratio(tp, tp + fn)
    specificity = _safe_ratio(tn, tn + fp)
    return {
        "auroc": auroc(y, probabilities),
        "balanced_accuracy": float(np.nanmean([sensitivity, specificity])),
        "f1": float(metrics.f1_score(y, predicted, zero_division=0)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _safe_ratio(tp, tp + fp),
        "npv": _safe_ratio(tn, tn + fn),
        "threshold": float(threshold),
        "n": int(len(y)),
        "positives": int(y.sum()),
    }


def multiclass_metrics(y_true: Array, probabilities: Array) -> dict[str, float]:
    """Macro one-vs-rest AUROC, balanced accuracy, macro F1, accuracy for a K-class task."""
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probabilities)
    predicted = probs.argmax(axis=1)
    present = np.unique(y)
    if len(present) > 1:
        columns = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
        value = (metrics.roc_auc_score(y, columns, multi_class="ovr", average="macro", labels=present)
                 if len(present) > 2 else metrics.roc_auc_score(y == present[1], columns[:, 1]))
    else:
        value = float("nan")
    return {
        "auroc": float(value),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y, predicted)),
        "f1": float(metrics.f1_score(y, predicted, average="macro", zero_division=0)),
        "accuracy": float(metrics.accuracy_score(y, predicted)),
        "n": int(len(y)),
    }


def threshold_for_sensitivity(y_true: Array, probabilities: Array, target: float) -> float:
    """A threshold whose sensitivity on (y_true, probabilities) is at least ``target``, keeping
    specificity as high as the target allows.

    It lies halfway between the lowest positive score that must be called positive and the next
    lower score, rather than on that score itself, so that it is less tuned to these very
    examples. Without positives the conventional 0.5 is returned.
    """
    y = np.asarray(y_true).astype(bool)
    scores = np.asarray(probabilities, dtype=float)
    positives = np.sort(scores[y])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = min(max(int(np.ceil(target * len(positives) - 1e-9)), 1), len(positives))
    cut = positives[needed - 1]
    below = scores[scores < cut]
    return float((cut + below.max()) / 2) if len(below) else float(cut)


def summarise_folds(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{metric}_mean`` and ``{metric}_std`` (population std over folds, NaNs ignored)."""
    keys = [k for k in per_fold[0] if isinstance(per_fold[0][k], (int, float))] if per_fold else []
    summary: dict[str, float] = {}
    for key in keys:
        values = np.array([fold[key] for fold in per_fold], dtype=float)
        finite = values[np.isfinite(values)]
        summary[f"{key}_mean"] = float(finite.mean()) if len(finite) else float("nan")
        summary[f"{key}_std"] = float(finite.std()) if len(finite) else float("nan")
    return summary


# --- bootstrap --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float
    resamples: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_ci(y_true: Array, scores: Array, statistic: Callable[[Array, Array], float], *,
                 resamples: int = 1000, level: float = 0.95, seed: int = 0,
                 groups: Array | None = None) -> Interval:
    """Percentile bootstrap of ``statistic(y, s)``; resampling ``groups`` (patients) when given."""
    y, s = np.asarray(y_true), np.asarray(scores)
    rng = np.random.default_rng(seed)
    units = np.unique(groups) if groups is not None else None
    members = [np.flatnonzero(groups == u) for u in units] if units is not None else None
    values = []
    for _ in range(resamples):
        if members is not None:
            chosen = rng.integers(0, len(members), len(members))
            index = np.concatenate([members[i] for i in chosen])
        else:
            index = rng.integers(0, len(y), len(y))
        value = statistic(y[index], s[index])
        if np.isfinite(value):
            values.append(value)
    alpha = (1.0 - level) / 2.0
    low, high = (np.quantile(values, [alpha, 1 - alpha]) if values else (float("nan"), float("nan")))
    return Interval(float(statistic(y, s)), float(low), float(high), level, len(values))


# --- DeLong -----------------------------------------------------------------------------------

def _fast_delong(ordered_scores: Array, positives: int) -> tuple[Array, Array]:
    """AUCs and their covariance for k predictors (rows) on examples ordered positives first.

    Sun & Xu (2014), Algorithm 1: midranks within positives (T_X), within negatives (T_Y) and
    over all examples (T_Z) give the structural components V10 and V01 in O(k·n log n).
    """
    m = positives
    n = ordered_scores.shape[1] - m
    tx = stats.rankdata(ordered_scores[:, :m], axis=1)
    ty = stats.rankdata(ordered_scores[:, m:], axis=1)
    tz = stats.rankdata(ordered_scores, axis=1)
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / 2.0 / n
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return aucs, sx / m + sy / n


@dataclass(frozen=True)
class DeLongResult:
    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float
    """Two-sided p of H0: AUC_a == AUC_b."""
    p_a_lower: float
    """One-sided p of H0: AUC_a >= AUC_b (small when a is significantly lower than b)."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def delong_test(y_true: Array, scores_a: Array, scores_b: Array) -> DeLongResult:
    """DeLong's test of two correlated ROC curves on the same examples."""
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        raise ValueError("DeLong's test needs both classes in the labels")
    order = np.concatenate([np.flatnonzero(y), np.flatnonzero(~y)])
    scores = np.vstack([np.asarray(scores_a, float)[order], np.asarray(scores_b, float)[order]])
    aucs, cov = _fast_delong(scores, int(y.sum()))
    difference = float(aucs[0] - aucs[1])
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if variance <= 1e-15:
        z = 0.0 if abs(difference) < 1e-12 else float(np.sign(difference) * np.inf)
    else:
        z = difference / np.sqrt(variance)
    return DeLongResult(float(aucs[0]), float(aucs[1]), difference, float(z),
                        float(2 * stats.norm.sf(abs(z))), float(stats.norm.cdf(z)))


def delong_variance(y_true: Array, scores: Array) -> tuple[float, float]:
    """One predictor's AUC and its DeLong variance."""
    y = np.asarray(y_true).astype(bool)
    order = np.concatenate([np.flatnonzero(y), np.flatnonzero(~y)])
    aucs, cov = _fast_delong(np.asarray(scores, float)[order][None, :], int(y.sum()))
    return float(aucs[0]), float(cov[0, 0])


# --- calibration ------------------------------------------------------------------------------

def reliability_table(y_true: Array, probabilities: Array, bins: int = 10) -> dict[str, list[float]]:
    """Per equal-width bin: mean confidence, observed frequency, count."""
    y = np.asarray(y_true, float)
    p = np.asarray(probabilities, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    confidence, frequency, count = [], [], []
    for b in range(bins):
        inside = which == b
        count.append(int(inside.sum()))
        confidence.append(float(p[inside].mean()) if inside.any() else float("nan"))
        frequency.append(float(y[inside].mean()) if inside.any() else float("nan"))
    return {"edges": edges.tolist(), "confidence": confidence, "frequency": frequency, "count": count}


def expected_calibration_error(y_true: Array, probabilities: Array, bins: int = 10) -> float:
    """ECE: count-weighted mean |observed frequency - mean predicted probability| over bins."""
    table = reliability_table(y_true, probabilities, bins)
    total = sum(table["count"])
    if total == 0:
        return float("nan")
    gaps = [c * abs(f - p) for c, f, p in zip(table["count"], table["frequency"], table["confidence"]) if c]
    return float(sum(gaps) / total)


def fit_temperature(y_true: Array, logits: Array) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of sigmoid(logits / T)."""
    y = np.asarray(y_true, float)
    z = np.asarray(logits, float)

    def nll(log_t: float) -> float:
        p = np.clip(sigmoid(z / np.exp(log_t)), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


# --- segmentation -----------------------------------------------------------------------------

def dice_iou(prediction: Array, truth: Array) -> tuple[float, float]:
    """Dice and IoU of two binary masks; both empty counts as a perfect 1.0."""
    a = np.asarray(prediction, bool)
    b = np.asarray(truth, bool)
    intersection = np.logical_and(a, b).sum()
    total = a.sum() + b.sum()
    union = np.logical_or(a, b).sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * intersection / total), float(intersection / union)


def segmentation_metrics(predictions: Sequence[Array], truths: Sequence[Array],
                         volumes: Sequence[str]) -> dict[str, object]:
    """Dice/IoU per slice and per volume (slices of a volume stacked) for binary masks."""
    per_slice = [dice_iou(p, t) for p, t in zip(predictions, truths)]
    per_volume: dict[str, tuple[float, float]] = {}
    for volume in dict.fromkeys(volumes):
        members = [i for i, v in enumerate(volumes) if v == volume]
        per_volume[volume] = dice_iou(np.stack([predictions[i] for i in members]),
                                      np.stack([truths[i] for i in members]))
    slice_dice = np.array([d for d, _ in per_slice])
    slice_iou = np.array([j for _, j in per_slice])
    volume_dice = np.array([d for d, _ in per_volume.values()])
    volume_iou = np.array([j for _, j in per_volume.values()])
    return {
        "dice": float(volume_dice.mean()) if len(volume_dice) else float("nan"),
        "iou": float(volume_iou.mean()) if len(volume_iou) else float("nan"),
        "dice_slice": float(slice_dice.mean()) if len(slice_dice) else float("nan"),
        "iou_slice": float(slice_iou.mean()) if len(slice_iou) else float("nan"),
        "dice_per_volume": {k: v[0] for k, v in per_volume.items()},
        "iou_per_volume": {k: v[1] for k, v in per_volume.items()},
        "dice_per_slice": slice_dice.tolist(),
        "n_volumes": len(per_volume),
        "n_slices": len(per_slice),
    }


def fit_temperature_multiclass(y_true: Array, logits: Array) -> float:
    """The temperature minimising the NLL of softmax(logits / T)."""
    y = np.asarray(y_true).astype(int)
    z = np.asarray(logits, float)

    def nll(log_t: float) -> float:
        p = np.clip(softmax(z / np.exp(log_t))[np.arange(len(y)), y], 1e-7, 1.0)
        return float(-np.mean(np.log(p)))

    result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


# --- held-out assessment (what a report shows) -------------------------------------------------

def assess_binary(y_test: Array, logits_test: Array, y_val: Array, logits_val: Array, *,
                  target_sensitivity: float, temperature_scaling: bool, resamples: int, seed: int,
                  groups: Array | None = None) -> dict[str, object]:
    """Test-set metrics with the temperature and threshold chosen on the validation fold."""
    temperature = fit_temperature(y_val, logits_val) if temperature_scaling and len(np.unique(y_val)) > 1 else 1.0
    threshold = threshold_for_sensitivity(y_val, sigmoid(np.asarray(logits_val) / temperature), target_sensitivity)
    raw = sigmoid(logits_test)
    calibrated = sigmoid(np.asarray(logits_test) / temperature)
    fpr, tpr, _ = metrics.roc_curve(y_test, calibrated) if len(np.unique(y_test)) > 1 else ([], [], [])
    return {
        "metrics": binary_metrics(y_test, calibrated, threshold),
        "auroc_ci": bootstrap_ci(y_test, calibrated, auroc, resamples=resamples, seed=seed,
                                 groups=groups).as_dict() if resamples else None,
        "temperature": temperature,
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "ece_before": expected_calibration_error(y_test, raw),
        "ece_after": expected_calibration_error(y_test, calibrated),
        "reliability_before": reliability_table(y_test, raw),
        "reliability_after": reliability_table(y_test, calibrated),
        "roc": {"fpr": list(map(float, fpr)), "tpr": list(map(float, tpr))},
        "probabilities": calibrated.tolist(),
    }


def _balanced_accuracy_of(probabilities: Array) -> Callable[[Array, Array], float]:
    def statistic(y: Array, index: Array) -> float:
        return float(metrics.balanced_accuracy_score(y, probabilities[index.astype(int)].argmax(axis=1)))

    return statistic


def per_class_metrics(y_true: Array, probabilities: Array, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each class against the rest at the model's call (the most probable class): sensitivity,
    specificity, one-vs-rest AUROC and the number of cases of the class."""
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probabilities)
    matrix = metrics.confusion_matrix(y, probs.argmax(axis=1), labels=list(range(len(classes))))
    total = int(matrix.sum())
    result = {}
    for k, name in enumerate(classes):
        tp, cases, called = int(matrix[k, k]), int(matrix[k].sum()), int(matrix[:, k].sum())
        tn = total - cases - called + tp
        result[name] = {"sensitivity": _safe_ratio(tp, cases), "specificity": _safe_ratio(tn, total - cases),
                        "auroc": auroc(y == k, probs[:, k]), "n": cases}
    return result


def assess_multiclass(y_test: Array, logits_test: Array, y_val: Array, logits_val: Array, *,
                      temperature_scaling: bool, resamples: int, seed: int,
                      groups: Array | None = None, classes: Sequence[str] | None = None) -> dict[str, object]:
    """Held-out macro AUROC and balanced accuracy (with a bootstrap CI), each class's sensitivity and
    specificity, the confusion matrix; the temperature fitted on the validation outputs."""
    temperature = fit_temperature_multiclass(y_val, logits_val) if temperature_scaling else 1.0
    probabilities = softmax(np.asarray(logits_test) / temperature)
    y = np.asarray(y_test).astype(int)
    classes = list(classes) if classes else [str(k) for k in range(probabilities.shape[1])]
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y).astype(float)
    index = np.arange(len(y), dtype=float)
    return {
        "metrics": multiclass_metrics(y, probabilities),
        "balanced_accuracy_ci": bootstrap_ci(y, index, _balanced_accuracy_of(probabilities), resamples=resamples,
                                             seed=seed, groups=groups).as_dict() if resamples else None,
        "temperature": temperature,
        "ece_after": expected_calibration_error(correct, confidence),
        "reliability_after": reliability_table(correct, confidence),
        "confusion": metrics.confusion_matrix(y, probabilities.argmax(axis=1),
                                              labels=list(range(probabilities.shape[1]))).tolist(),
        "classes": classes,
        "per_class": per_class_metrics(y, probabilities, classes),
    }


def regression_metrics(y_true: Array, predicted: Array) -> dict[str, float]:
    y, p = np.asarray(y_true, float), np.asarray(predicted, float)
    return {"mae": float(metrics.mean_absolute_error(y, p)), "rmse": float(metrics.root_mean_squared_error(y, p)),
            "r2": float(metrics.r2_score(y, p)) if len(y) > 1 else float("nan"), "n": int(len(y))}


def bland_altman(y_true: Array, predicted: Array) -> dict[str, object]:
    """Mean difference (bias, predicted - true) and the 95 % limits of agreement."""
    y, p = np.asarray(y_true, float), np.asarray(predicted, float)
    difference = p - y
    bias, spread = float(difference.mean()), float(difference.std(ddof=1)) if len(y) > 1 else 0.0
    return {"mean": ((p + y) / 2).tolist(), "difference": difference.tolist(), "bias": bias,
            "low": bias - 1.96 * spread, "high": bias + 1.96 * spread}


def assess_regression(y_test: Array, predicted: Array, baseline: float, *, resamples: int, seed: int,
                      groups: Array | None = None) -> dict[str, object]:
    """Held-out regression metrics, a bootstrap CI of the MAE, and the MAE of always predicting
    ``baseline`` (the development set's mean: what a model that learned nothing scores)."""
    y, p = np.asarray(y_test, float), np.asarray(predicted, float)
    mae = lambda a, b: float(np.mean(np.abs(a - b)))  # noqa: E731
    return {
        "metrics": regression_metrics(y, p),
        "mae_ci": bootstrap_ci(y, p, mae, resamples=resamples, seed=seed, groups=groups).as_dict()
        if resamples else None,
        "baseline_mae": mae(y, np.full_like(y, baseline)),
        "bland_altman": bland_altman(y, p),
        "labels": y.tolist(),
        "predictions": p.tolist(),
    }


def paired_absolute_errors(y_true: Array, candidate: Array, other: Array) -> dict[str, float]:
    """MAE of both and the two-sided Wilcoxon signed-rank p of their absolute errors on the same cases."""
    y = np.asarray(y_true, float)
    a, b = np.abs(np.asarray(candidate, float) - y), np.abs(np.asarray(other, float) - y)
    p_value = float(stats.wilcoxon(a, b).pvalue) if len(y) > 1 and np.any(a != b) else 1.0
    return {"mae_candidate": float(a.mean()), "mae_active": float(b.mean()), "p_value": p_value, "n": int(len(y))}


def dice_ci(per_volume: Sequence[float], *, resamples: int, seed: int, level: float = 0.95) -> Interval:
    """Percentile bootstrap of the mean per-volume Dice."""
    values = np.asarray(per_volume, float)
    rng = np.random.default_rng(seed)
    means = [float(values[rng.integers(0, len(values), len(values))].mean()) for _ in range(resamples)]
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha]) if means else (float("nan"), float("nan"))
    return Interval(float(values.mean()), float(low), float(high), level, len(means))
