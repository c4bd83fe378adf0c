"""The import layers and the torch-free packages are contracts (``[importlinter]`` in setup.cfg),
checked here with import-linter on the real tree and on a copy broken on purpose."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cradle", "training", "inference", "node", "storage", "config", "common")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages found in ``tree`` (it imports nothing, it reads the source)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(tree / "setup.cfg")], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tree / "setup.cfg")
    return tree


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(("module", "source", "broken"), [
    ("storage/upward.py", "def rules():\n    from node import routing\n    return routing\n",
     "storage.upward -> node.routing"),
    ("node/sneaky.py", "def tensor():\n    import torch\n    return torch.zeros(1)\n", "node.sneaky -> torch"),
], ids=["upward import", "torch inside a function of node"])
def test_a_wrong_import_breaks_one_contract(tree_copy: Path, module: str, source: str, broken: str) -> None:
    path = tree_copy / module
    path.write_text(source)
    try:
        result = lint_imports(tree_copy)
    finally:
        path.unlink()
    assert result.returncode == 1
    assert "Contracts: 1 kept, 1 broken." in result.stdout
    assert broken in result.stdout
