"""The code stays ruff- and pyright-clean (the tools come with the test extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [["ruff", "check", "src", "tests", "bench"], ["ruff", "format", "--check", "src", "tests", "bench"], ["pyright"]],
    ids=["ruff-check", "ruff-format", "pyright"],
)
def test_clean(cmd: list[str]) -> None:
    exe = BIN / cmd[0] if (BIN / cmd[0]).exists() else shutil.which(cmd[0])
    if exe is None:
        pytest.fail(f"{cmd[0]} is not installed; run scripts/setup.sh")
    done = subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
