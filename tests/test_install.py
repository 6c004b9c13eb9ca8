"""The built wheel, installed in a fresh venv and used outside the repository, carries everything it needs:
the example scenarios by name, the E2E data, the runtime (workers start from the installed package)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding only the wheel; its dependencies come from this interpreter's environment (no network)."""
    root = tmp_path_factory.mktemp("installed")
    # Built from a copy: a build in the checkout would leave build/, whose stale files a later wheel could carry.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("hsplit_sim-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # A path line in a .pth file is appended after the venv's own site-packages, so the wheel's copy of
    # hsplit_sim wins over the checkout this interpreter may have installed in editable mode.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HSPLIT_SIM_E2E_DIR", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"

    def hsplit_sim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "hsplit-sim"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)

    hsplit_sim.python, hsplit_sim.work, hsplit_sim.env = python, work, env
    return hsplit_sim


def test_the_package_comes_from_the_wheel(installed):
    where = subprocess.run([installed.python, "-c", "import hsplit_sim, analysis; print(hsplit_sim.__file__); "
                            "print(analysis.__file__)"], cwd=installed.work, env=installed.env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(str(REPO) not in path and "site-packages" in path for path in where)


def test_examples_are_listed_and_copied(installed):
    listing = installed("examples")
    assert listing.returncode == 0, listing.stderr
    for name in ("quickstart", "tiny", "paper/tiny-heterogeneous", "whatif/bandwidth"):
        assert name in listing.stdout
    copied = installed("examples", "--copy", "mine")
    assert copied.returncode == 0, copied.stderr
    assert (installed.work / "mine" / "tiny.yaml").is_file()
    assert (installed.work / "mine" / "paper" / "README.md").is_file()
    again = installed("examples", "--copy", "mine")
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "exists already" in again.stderr


def test_shipped_e2e_data_validates_without_a_directory(installed):
    checked = installed("validate", "paper/tiny-heterogeneous")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == "ok"


def test_a_tiny_example_trains_on_the_shipped_e2e_data_outside_the_repository(installed):
    done = installed("run", "tiny", "--set", "output.dir=out", "--set", "data.name=e2e", "--set",
                     "data.test_examples=2")
    assert done.returncode == 0, done.stderr
    run_dir = Path(installed.work, done.stdout.strip().splitlines()[-1])
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    assert list(rounds["round"]) == [0, 1, 2] and rounds["eval_ppl"].notna().all()
    generations = pd.read_parquet(run_dir / "generations.parquet")
    assert len(generations) == 2 and generations["mr"].str.startswith("name[").all()
    assert (run_dir / "plots" / "perplexity.png").is_file()


def test_a_copied_sweep_runs_and_reports(installed):
    assert installed("examples", "--copy", "ex").returncode == 0
    swept = installed("sweep", "ex/whatif/accelerators.yaml", "--timing-only", "--set", "output.dir=out",
                      "--set", "clients.0.count=2")
    assert swept.returncode == 0, swept.stderr
    sweep_dir = Path(installed.work, swept.stdout.strip().splitlines()[-1])
    table = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert len(table) == 6 and (table["status"] == "completed").all()
    reported = installed("report", str(sweep_dir))
    assert reported.returncode == 0, reported.stderr
    assert (sweep_dir / "report" / "index.html").is_file()
