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
    assert report["ratio"] > 0 and report["count"] == 8 and report["node_fsync"] is True
    # the receivers' CPU time during each push (Linux /proc): the node's includes hashing and the index
    assert len(report["baseline_cpu_seconds"]) == len(report["node_cpu_seconds"]) == 1
    assert 0 < report["baseline_cpu_seconds"][0] and 0 < report["node_cpu_seconds"][0]


def test_summary_reports_every_push_and_per_instance_times(bench: ModuleType) -> None:
    report = bench.BenchReport(100, 2.0, 262144, baseline_seconds=[1.0, 2.0], node_seconds=[1.5, 2.2],
                               baseline_cpu_seconds=[0.5, 0.7], node_cpu_seconds=[1.0, 1.2])
    lines = report.summary().splitlines()
    assert lines[3] == "  ratio node / minimal SCP: 1.23  (target <= 1.2); per push: 1.50, 1.10"
    assert lines[4] == ("  per instance, wall / receiver CPU (ms):  minimal SCP 15.0 / 6.0,  node 18.5 / 11.0")
