"""The run report: ``report.json``, a readable ``report.md`` and ``report.html``, and PNG plots
(ROC, reliability diagram, confusion matrix, loss curves, Dice box plot, Bland-Altman plots of regression
values and lung volumes, regression scatter), saved in the run directory and with the
model version. Plots use matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from training.evaluate import bland_altman  # noqa: E402

CLASSIFICATION_ROWS = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "ppv", "npv")
SEGMENTATION_ROWS = ("dice", "dice_raw", "iou", "iou_raw", "dice_slice")
"""As shipped (post-processed) and the raw network output (``_raw``), per volume."""
ROWS = {"binary": CLASSIFICATION_ROWS, "multiclass": ("auroc", "balanced_accuracy", "f1", "accuracy"),
        "segmentation": SEGMENTATION_ROWS, "regression": ("mae", "rmse", "r2")}
"""The metrics a report shows for each kind of task."""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


# --- plots ------------------------------------------------------------------------------------

def plot_roc(curves: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for curve in curves:
        ax.plot(curve["fpr"], curve["tpr"], lw=curve.get("lw", 2), alpha=curve.get("alpha", 1.0),
                label=curve["label"])
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(tables: dict[str, dict[str, list[float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, table in tables.items():
        pairs = [(c, f) for c, f, n in zip(table["confidence"], table["frequency"], table["count"]) if n]
        if pairs:
            ax.plot(*zip(*pairs), marker="o", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability diagram",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_losses(folds: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for fold in folds:
        epochs = [h["epoch"] + 1 for h in fold["history"]]
        line, = ax.plot(epochs, [h["train_loss"] for h in fold["history"]], label=f"fold {fold['fold']} train")
        if all("val_loss" in h for h in fold["history"]):
            ax.plot(epochs, [h["val_loss"] for h in fold["history"]], ls="--", color=line.get_color(),
                    label=f"fold {fold['fold']} validation")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss curves")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_dice(groups: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [k for k, v in groups.items() if v]
    ax.boxplot([groups[k] for k in labels], tick_labels=labels)
    ax.set(ylabel="Dice per volume", title="Dice", ylim=(0, 1.02))
    return _save(fig, path)


def plot_regression_scatter(curve: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    labels, predictions = curve["labels"], curve["predictions"]
    ax.scatter(labels, predictions, s=12)
    low, high = min(labels + predictions), max(labels + predictions)
    ax.plot([low, high], [low, high], "k--", lw=1, label="identity")
    ax.set(xlabel=f"label ({curve['units']})", ylabel=f"predicted ({curve['units']})", title="Held-out test")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_bland_altman(panels: dict[str, dict[str, Any]], units: str, path: Path) -> Path:
    """Prediction − reference against their mean, one panel each, with the bias and 95 % limits of
    agreement (``training.evaluate.bland_altman``)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, agreement) in zip(axes[0], panels.items()):
        ax.scatter(agreement["mean"], agreement["difference"], s=12)
        for key, style in (("bias", "-"), ("low", "--"), ("high", "--")):
            ax.axhline(agreement[key], color="k", ls=style, lw=1, label=f"{key} {agreement[key]:.2f}")
        ax.set(xlabel=f"mean of prediction and reference ({units})",
               ylabel=f"prediction − reference ({units})", title=title)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion(curve: dict[str, Any], path: Path) -> Path:
    """The held-out confusion matrix (rows: the label, columns: the model's call), counts in the cells."""
    matrix, classes = curve["matrix"], curve["classes"]
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="model's call", ylabel="label", title="Held-out confusion matrix")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- pages ------------------------------------------------------------------------------------

def _metric_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, cross-validation mean ± std, held-out test) rows."""
    names = ROWS.get(report["kind"], CLASSIFICATION_ROWS)
    cv, test = report["cv"], report["test"]["metrics"]
    rows = []
    for name in names:
        if f"{name}_mean" not in cv and name not in test:
            continue
        spread = f"{_fmt(cv.get(f'{name}_mean', float('nan')))} ± {_fmt(cv.get(f'{name}_std', float('nan')))}"
        rows.append((name, spread, _fmt(test.get(name, float("nan")))))
    return rows


def _facts(report: dict[str, Any]) -> list[tuple[str, str]]:
    test = report["test"]
    facts = [("task", report["task"]), ("version", report.get("version") or "not registered"),
             ("promoted", "yes" if report["promoted"] else "no"), ("reason", report["decision"]["reason"]),
             ("architecture", report["recipe"]["arch"]), ("strategy", report["recipe"]["strategy"]),
             ("initialisation", report["init"]), ("seed", str(report["recipe"]["seed"])),
             ("manifest", report["manifest"]["hash"][:16]), ("split", json.dumps(report["manifest"]["counts"])),
             ("patients", str(report["manifest"]["patients"])), ("code", report["code_version"]),
             ("device", report["device"]), ("training time", f"{report['seconds']:.0f} s")]
    transfer = report.get("init_transfer")
    if transfer:
        facts.append(("initial weights", f"{transfer['loaded']}/{transfer['wanted']} tensors loaded"
                      + (f", {transfer['adapted']} adapted to 1 input channel" if transfer["adapted"] else "")
                      + f", {transfer['missing']} kept new, {transfer['unused']} of the source unused"))
    facts += [("warning", warning) for warning in report.get("warnings", [])]
    left = report.get("left_out")
    if left:
        facts.append(("left out", f"{left['outside_population']} film(s) outside the population"
                      + "".join(f"; {reason}: {n}" for reason, n in left["by_reason"].items())))
    if report.get("population"):
        facts.append(("trained and validated on", _population_words(report["population"])))
    for key, label in (("auroc_ci", "test AUROC 95% CI"), ("dice_ci", "test Dice 95% CI"),
                       ("balanced_accuracy_ci", "test balanced accuracy 95% CI"), ("mae_ci", "test MAE 95% CI")):
        if test.get(key):
            facts.append((label, f"{_fmt(test[key]['low'])} – {_fmt(test[key]['high'])}"))
    for key, label in (("threshold", "operating threshold"), ("temperature", "temperature"),
                       ("ece_before", "ECE before scaling"), ("ece_after", "ECE after scaling"),
                       ("baseline_mae", "MAE of predicting the development mean")):
        if key in test:
            facts.append((label, _fmt(test[key])))
    for name, comparison in report.get("comparisons", {}).items():
        if comparison:
            facts.append((f"vs {name}", comparison.get("summary", "")))
    if report.get("peak_rss_mb"):
        facts.append(("peak resident memory", ", ".join(f"{v:.0f} MB {k}" for k, v in report["peak_rss_mb"].items())))
    return facts


def _population_words(population: dict[str, Any]) -> str:
    """The population a version saw, as the report states it."""
    parts = [f"{key.replace('_', ' ')}: {', '.join(v or '(not given)' for v in population[key]) or 'any'}"
             for key in ("modalities", "body_parts", "views") if key in population]
    if population.get("min_age_days") is not None:
        parts.append(f"age {population['min_age_days']}–{population['max_age_days']} days")
    return "; ".join(parts)


def _class_rows(report: dict[str, Any]) -> list[list[str]]:
    """A multiclass task's classes on the held-out test: sensitivity, specificity, AUROC, cases."""
    return [[name, _fmt(v["sensitivity"]), _fmt(v["specificity"]), _fmt(v["auroc"]), str(v["n"])]
            for name, v in (report["test"].get("per_class") or {}).items()]


CLASS_COLUMNS = ("class", "sensitivity", "specificity", "AUROC (one vs rest)", "cases")

VOLUME_COLUMNS = ("series", "Dice raw", "Dice", "IoU raw", "IoU", "left mL (ref)", "right mL (ref)",
                  "left/right Dice", "s")


def _volume_rows(report: dict[str, Any]) -> list[list[str]]:
    """The held-out series as shipped (segmentation): one row each."""
    rows = []
    for v in report["test"].get("volumes") or []:
        ref = v["reference_ml"] or {}
        sides = v["side_dice"]
        rows.append([v["series_uid"], *(_fmt(v[k]) for k in ("dice_raw", "dice", "iou_raw", "iou")),
                     *(f"{v['predicted_ml'][s]:.1f} ({_fmt(ref.get(s), 1)})" for s in ("left", "right")),
                     "n/a" if sides is None else f"{sides['left']:.3f}/{sides['right']:.3f}"
                     + (" swapped" if v["sides_swapped"] else ""), f"{v['seconds']:.2f}"])
    return rows


def markdown(report: dict[str, Any], images: list[str]) -> str:
    lines = [f"# {report['task']} training report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _facts(report)]
    lines += ["", "| metric | cross-validation (mean ± std) | held-out test |", "|---|---|---|"]
    lines += [f"| {m} | {cv} | {t} |" for m, cv, t in _metric_rows(report)]
    lines += ["", "## Per fold", "", "| fold | best epoch | " + " | ".join(_fold_columns(report)) + " |",
              "|---|---|" + "---|" * len(_fold_columns(report))]
    for fold in report["folds"]:
        values = " | ".join(_fmt(fold["metrics"].get(c, float("nan"))) for c in _fold_columns(report))
        lines.append(f"| {fold['fold']} | {fold['best_epoch'] + 1} | {values} |")
    if _class_rows(report):
        lines += ["", "## Held-out test by class", "", "| " + " | ".join(CLASS_COLUMNS) + " |",
                  "|" + "---|" * len(CLASS_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in _class_rows(report)]
    if _volume_rows(report):
        lines += ["", "## Held-out volumes as shipped (post-processed) and raw", "",
                  "| " + " | ".join(VOLUME_COLUMNS) + " |", "|" + "---|" * len(VOLUME_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in _volume_rows(report)]
    lines += [""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    return "\n".join(lines)


def _fold_columns(report: dict[str, Any]) -> list[str]:
    return list(ROWS.get(report["kind"], CLASSIFICATION_ROWS))


def html_page(report: dict[str, Any], images: list[str]) -> str:
    esc = html.escape
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _facts(report))
    metrics = "".join(f"<tr><td>{esc(m)}</td><td>{esc(cv)}</td><td>{esc(t)}</td></tr>"
                      for m, cv, t in _metric_rows(report))
    columns = _fold_columns(report)
    folds = "".join(
        "<tr>" + f"<td>{fold['fold']}</td><td>{fold['best_epoch'] + 1}</td>"
        + "".join(f"<td>{esc(_fmt(fold['metrics'].get(c, float('nan'))))}</td>" for c in columns) + "</tr>"
        for fold in report["folds"])
    volumes = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _volume_rows(report))
    if volumes:
        volumes = ("<h2>Held-out volumes as shipped (post-processed) and raw</h2><table><tr>"
                   + "".join(f"<th>{esc(c)}</th>" for c in VOLUME_COLUMNS) + f"</tr>{volumes}</table>")
    classes = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _class_rows(report))
    if classes:
        classes = ("<h2>Held-out test by class</h2><table><tr>"
                   + "".join(f"<th>{esc(c)}</th>" for c in CLASS_COLUMNS) + f"</tr>{classes}</table>")
    pictures = "".join(f'<figure><img src="{esc(i)}" alt="{esc(Path(i).stem)}"></figure>' for i in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report['task'])} training report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:.5em}}
img{{max-width:28em}}</style></head><body>
<h1>{esc(report['task'])} training report</h1>
<table>{facts}</table>
<h2>Metrics</h2><table><tr><th>metric</th><th>cross-validation (mean ± std)</th><th>held-out test</th></tr>{metrics}</table>
<h2>Per fold</h2><table><tr><th>fold</th><th>best epoch</th>{''.join(f'<th>{esc(c)}</th>' for c in columns)}</tr>{folds}</table>
{classes}
{volumes}
<h2>Plots</h2>{pictures}
<p><small>Synthetic or clinical, these numbers describe this archive's held-out patients only.</small></p>
</body></html>
"""


def write_report(directory: Path, report: dict[str, Any], curves: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md, report.html and the plots into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    if curves.get("roc"):
        images.append(plot_roc(curves["roc"], directory / "roc.png"))
    if curves.get("reliability"):
        images.append(plot_reliability(curves["reliability"], directory / "reliability.png"))
    if report["folds"]:
        images.append(plot_losses(report["folds"], directory / "loss.png"))
    if curves.get("confusion"):
        images.append(plot_confusion(curves["confusion"], directory / "confusion.png"))
    if curves.get("dice"):
        images.append(plot_dice(curves["dice"], directory / "dice_box.png"))
    if curves.get("regression"):
        curve = curves["regression"]
        images.append(plot_regression_scatter(curve, directory / "scatter.png"))
        images.append(plot_bland_altman({"held-out test": curve["bland_altman"]}, curve["units"],
                                        directory / "bland_altman.png"))
    if curves.get("bland_altman") and any(curves["bland_altman"].values()):
        panels = {f"{side} lung volume": bland_altman([r for _, r in pairs], [p for p, _ in pairs])
                  for side, pairs in curves["bland_altman"].items() if pairs}
        images.append(plot_bland_altman(panels, "mL", directory / "bland_altman.png"))
    names = [p.name for p in images]
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (directory / "report.md").write_text(markdown(report, names))
    (directory / "report.html").write_text(html_page(report, names))
    return [directory / "report.json", directory / "report.md", directory / "report.html", *images]
