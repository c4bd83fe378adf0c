"""The ingest benchmark runs end to end (small and once; the ratio is reported, not asserted)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks`` lives at the repository root and is not an installed package."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.ingest")


@pytest.mark.slow
def test_benchmark_reports_a_ratio(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--count", "8", "--size-mb", "0.25", "--repeat", "1", "--workdir", str(tmp_path), "--json"]
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["baseline_seconds"]) == len(report["node_seconds"]) == 1
    assert report["ratio"] > 0 and report["count"] == 8
