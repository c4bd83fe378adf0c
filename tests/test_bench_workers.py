"""The worker benchmark runs end to end (small; the ratio is printed, not asserted: it depends on how
busy the machine's cores are), and each job ran exactly once in each phase."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.workers")


@pytest.mark.slow
def test_worker_benchmark_reports_a_ratio(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--jobs", "8", "--cpu-seconds", "0.2", "--workdir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs_one"] == report["runs_two"] == 8, "each job ran exactly once"
    assert report["ratio"] > 0
    with capsys.disabled():
        print(f"\nworkers benchmark ({report['index']} + {report['broker']}): one worker "
              f"{report['one_worker_jobs_per_second']:.2f} jobs/s, two {report['two_workers_jobs_per_second']:.2f} "
              f"jobs/s, ratio {report['ratio']:.2f}")
