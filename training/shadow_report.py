"""The comparison report of a version in shadow (``cradle models compare``): ``compare.json`` and
``compare.html`` with its plots, in ``models_dir/TASK/reports/VERSION/shadow/``, beside the
version's training report. Plots use matplotlib's Agg backend, as the training report does."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from training.report import _fmt, _save, plt
from training.shadow import Comparison


def report_dir(models_dir: Path, comparison: Comparison) -> Path:
    return Path(models_dir) / comparison.task / "reports" / comparison.version / "shadow"


def plot_probabilities(comparison: Comparison, path: Path) -> Path:
    """Shadow against active probability per case, and the histogram of their differences."""
    active, shadow = comparison.series["active_probability"], comparison.series["shadow_probability"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.scatter(active, shadow, s=14, alpha=0.7)
    left.plot([0, 1], [0, 1], "k--", lw=1)
    left.set(xlabel="active version's probability", ylabel=f"{comparison.version}'s probability",
             xlim=(0, 1), ylim=(0, 1), title="Per case")
    right.hist([s - a for a, s in zip(active, shadow)], bins=20, range=(-1, 1))
    right.set(xlabel="shadow - active probability", ylabel="cases", title="Differences")
    return _save(fig, path)


def plot_values(comparison: Comparison, path: Path) -> Path:
    active, shadow = comparison.series["active_value"], comparison.series["shadow_value"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(active, shadow, s=14, alpha=0.7)
    low, high = min(active + shadow), max(active + shadow)
    ax.plot([low, high], [low, high], "k--", lw=1)
    ax.set(xlabel="active version", ylabel=comparison.version, title="Per case")
    return _save(fig, path)


def plot_dice(comparison: Comparison, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    left.hist(comparison.series["dice"], bins=20, range=(0, 1))
    left.set(xlabel="Dice between the versions' masks", ylabel="cases", title="Agreement")
    right.hist(comparison.series["volume_difference_ml"], bins=20)
    right.set(xlabel="shadow - active total volume (mL)", ylabel="cases", title="Volume differences")
    return _save(fig, path)


def _plots(comparison: Comparison, directory: Path) -> list[Path]:
    if not comparison.cases:
        return []
    if "active_probability" in comparison.series:
        return [plot_probabilities(comparison, directory / "probabilities.png")]
    if "active_value" in comparison.series:
        return [plot_values(comparison, directory / "values.png")]
    return [plot_dice(comparison, directory / "dice.png")]


def _rows(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append((f"{prefix}{key}", _fmt(value)))
    return rows


def html_page(data: dict[str, Any], images: list[str]) -> str:
    esc = html.escape
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _rows(data))
    pictures = "".join(f'<figure><img src="{esc(i)}" alt="{esc(Path(i).stem)}"></figure>' for i in images)
    beside = ", ".join(data["active_versions"]) or "the active version"
    title = f"{data['task']}: {data['version']} in shadow beside {beside}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:.5em}}
img{{max-width:40em}}</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(str(data['cases']))} studies seen by both versions; agreement {esc(_fmt(data['agreement']))}.</p>
<table>{table}</table>
<h2>Plots</h2>{pictures}
<p><small>The shadow version's results were archived and sent to research destinations only.</small></p>
</body></html>
"""


def write_compare_report(directory: Path, comparison: Comparison) -> list[Path]:
    """Write compare.json, compare.html and the plots into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = comparison.as_dict()
    images = _plots(comparison, directory)
    (directory / "compare.json").write_text(json.dumps({**data, "per_case": comparison.series}, indent=2,
                                                       default=str) + "\n")
    (directory / "compare.html").write_text(html_page(data, [p.name for p in images]))
    return [directory / "compare.json", directory / "compare.html", *images]
