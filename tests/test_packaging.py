"""The wheel carries every module and data file of the tree: a package forgotten in
pyproject.toml's list would install without it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
FOLDERS = {
    "core": "wirestate/core",
    "adapters": "wirestate/adapters",
    "models": "wirestate/models",
    "testing": "wirestate/testing",
}


def test_the_wheel_holds_every_file_of_the_tree(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("wirestate-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", *FOLDERS], capture_output=True, text=True, check=True
    ).stdout.split()
    expected = set()
    for name in tracked:
        folder, _, rest = name.partition("/")
        if name.endswith((".py", ".typed")) or "/static/" in name:
            expected.add(f"{FOLDERS[folder]}/{rest}")
    assert expected, "no tracked files found"
    assert sorted(expected - inside) == []
