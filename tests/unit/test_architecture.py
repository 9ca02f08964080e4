"""The package layers of ARCHITECTURE.md hold: import-linter's contracts (pyproject.toml) pass on
the code, and fail on a copy of it with one back-edge or one sibling cycle added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run the contracts of `root/pyproject.toml` on the `rfsr_ray` package under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_every_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # train must not depend on the sweep package above it
        ("rfsr_ray/train/loop.py", "import rfsr_ray.tune.sweep", "Layers"),
        # a lazy import counts as much as a top-level one
        ("rfsr_ray/config/schema.py", "def _f():\n    import rfsr_ray.models", "Layers"),
        # losses/rewards.py imports losses/imagereward.py; the reverse closes a cycle
        ("rfsr_ray/losses/imagereward.py", "import rfsr_ray.losses.rewards", "cycles"),
    ],
)
def test_a_back_edge_or_a_cycle_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "rfsr_ray", tmp_path / "rfsr_ray")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    # A back-edge between packages is also a cycle among rfsr_ray's children: both may break.
    verdicts = {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in result.stdout.splitlines()
        if line.endswith((" KEPT", " BROKEN"))
    }
    assert any(broken in name and verdict == "BROKEN" for name, verdict in verdicts.items()), (
        result.stdout
    )
