"""Runs the browser client's unit tests (``tests/js/*.test.mjs``) under Node's own test
runner, so ``pytest`` covers them; fails with Node's output. Without Node they skip, except
under CI (``CI`` set), where they fail: ``.ci/run`` installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_the_client_logic_passes_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("Node is not installed; CI must provide it (.ci/run installs it)")
        pytest.skip("Node is not installed (apt-get install nodejs)")
    files = sorted(str(p) for p in HERE.glob("*.test.mjs"))
    assert files, "no tests/js/*.test.mjs found"
    done = subprocess.run(
        [node, "--test", *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"node --test failed:\n{done.stdout}\n{done.stderr}"
    assert "# fail 0" in done.stdout, done.stdout
