"""The Ray executor: a sweep's points as tasks on a local Ray instance."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hsplit_sim.experiment.sweep import load_sweep_file, run_sweep

ray = pytest.importorskip("ray")
# A local Ray instance and its workers need the machine to themselves (make test runs these after the others)
pytestmark = pytest.mark.ray

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml"


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_sweep_points_run_as_ray_tasks(tmp_path, local_ray):
    shutil.copy(TINY, tmp_path / "base.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"algorithm.name": ["splitlora", "fedlora"]}}))
    sweep = load_sweep_file(path, [f"output.dir={tmp_path / 'runs'}", "training.rounds=1",
                                   "runtime.timing_only=true"])
    sweep_dir = run_sweep(sweep, processes=2, progress=False, executor="ray")
    table = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert list(table["status"]) == ["completed", "completed"]
    assert all((sweep_dir / run_dir / "summary.json").is_file() for run_dir in table["run_dir"])
    assert all("exit status 0" in (sweep_dir / "points" / p / "point.log").read_text() for p in table["point"])
