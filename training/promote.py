"""The promotion gate: a candidate replaces the active version only when it is at least as good on
the same held-out test set, and never when it is below the absolute floor.

Binary tasks: the candidate's test AUROC must reach ``gate.min_auroc`` (a model trained on shuffled
labels scores about 0.5 and is refused), must not be significantly lower than the active
version's on the same images (one-sided DeLong at ``gate.delong_alpha``), and must not fall more
than ``gate.max_auroc_drop`` below it; with ``gate.require_significant`` it must be significantly
higher. Views: the same floor and drop on the macro AUROC. Segmentation: the mean per-volume
Dice must reach ``gate.min_dice`` and not fall more than ``gate.max_dice_drop`` below the
active version's on the same volumes. Regression: the held-out MAE must be at most
``gate.max_mae_ratio`` of the MAE of always predicting the development mean (and at most
``gate.max_mae`` when set), and never worse than the active version's on the same images.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from training.recipe import GateConfig

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decide(checks: list[Check]) -> Decision:
    failed = [c for c in checks if not c.passed]
    if failed:
        return Decision(False, "; ".join(c.detail for c in failed), checks)
    return Decision(True, "; ".join(c.detail for c in checks), checks)


def gate_auroc(gate: GateConfig, candidate: float, comparison: dict[str, Any] | None) -> Decision:
    """``comparison``: ``{"version", "auc_active", "auc_candidate", "p_candidate_lower", "p_value", "n"}``
    on the same test images, or None when no version is active."""
    checks = [Check("floor", candidate >= gate.min_auroc,
                    f"test AUROC {candidate:.3f} {'reaches' if candidate >= gate.min_auroc else 'is below'} "
                    f"the floor {gate.min_auroc:.2f}")]
    if comparison is None:
        checks.append(Check("active", True, "no active version to compare with"))
        return _decide(checks)
    active, mine, version = comparison["auc_active"], comparison["auc_candidate"], comparison["version"]
    p_lower = comparison.get("p_candidate_lower")
    if p_lower is not None:
        significant_drop = p_lower < gate.delong_alpha
        checks.append(Check("delong", not significant_drop,
                            f"AUROC {mine:.3f} vs {active:.3f} of {version} on the same {comparison['n']} images: "
                            f"{'significantly lower' if significant_drop else 'not significantly lower'} "
                            f"(DeLong one-sided p={p_lower:.3g})"))
    drop = active - mine
    checks.append(Check("drop", drop <= gate.max_auroc_drop + 1e-12,
                        f"AUROC change vs {version}: {-drop:+.3f} (largest accepted drop {gate.max_auroc_drop:.3f})"))
    if gate.require_significant:
        p_two = comparison.get("p_value", 1.0)
        better = mine > active and p_two is not None and p_two / 2 < gate.delong_alpha
        checks.append(Check("gain", better, f"gain over {version} {'is' if better else 'is not'} significant"))
    return _decide(checks)


def gate_dice(gate: GateConfig, candidate: float, comparison: dict[str, Any] | None) -> Decision:
    checks = [Check("floor", candidate >= gate.min_dice,
                    f"test Dice {candidate:.3f} {'reaches' if candidate >= gate.min_dice else 'is below'} "
                    f"the floor {gate.min_dice:.2f}")]
    if comparison is None:
        checks.append(Check("active", True, "no active version to compare with"))
        return _decide(checks)
    drop = comparison["dice_active"] - comparison["dice_candidate"]
    checks.append(Check("drop", drop <= gate.max_dice_drop + 1e-12,
                        f"Dice {comparison['dice_candidate']:.3f} vs {comparison['dice_active']:.3f} of "
                        f"{comparison['version']} on the same {comparison['n']} volumes "
                        f"(largest accepted drop {gate.max_dice_drop:.3f})"))
    return _decide(checks)


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed version."""
    try:
        result = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPOSITORY,
                                capture_output=True, text=True, timeout=10, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return f"git:{result.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"cradle {metadata.version('cradle')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def gate_mae(gate: GateConfig, candidate: float, baseline: float, comparison: dict[str, Any] | None,
             units: str) -> Decision:
    """``comparison``: ``{"version", "mae_active", "mae_candidate", "p_value", "n"}`` on the same images."""
    limit = gate.max_mae_ratio * baseline
    checks = [Check("floor", candidate <= limit,
                    f"test MAE {candidate:.2f} {units} {'is within' if candidate <= limit else 'is above'} "
                    f"{gate.max_mae_ratio:.2f} x the {baseline:.2f} {units} of predicting the mean")]
    if gate.max_mae is not None:
        checks.append(Check("ceiling", candidate <= gate.max_mae,
                            f"test MAE {candidate:.2f} {units} (largest accepted {gate.max_mae:.2f})"))
    if comparison is None:
        checks.append(Check("active", True, "no active version to compare with"))
        return _decide(checks)
    worse = comparison["mae_candidate"] > comparison["mae_active"] + 1e-12
    checks.append(Check("active", not worse,
                        f"MAE {comparison['mae_candidate']:.2f} vs {comparison['mae_active']:.2f} {units} of "
                        f"{comparison['version']} on the same {comparison['n']} images "
                        f"(Wilcoxon p={comparison['p_value']:.3g}): {'worse' if worse else 'not worse'}"))
    return _decide(checks)
