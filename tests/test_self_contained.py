"""The repository stands on its own: nothing tracked refers to folders beside the checkout."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BESIDE = "../" + "shared"  # spelled in two parts so this file does not match itself


def test_no_tracked_file_refers_to_a_folder_beside_the_checkout():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "grep", "-I", "-l", "-F", BESIDE], cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 1, f"tracked files refer to {BESIDE}: {found.stdout.split()}"
