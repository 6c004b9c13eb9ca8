"""The results contract (hsplit_sim/results.py) is what runs write and what analysis reads."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from hsplit_sim import results
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import load_scenario

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml"


def test_every_event_kind_has_a_category():
    assert set(results.EVENT_KINDS.values()) == set(results.EVENT_CATEGORIES)
    assert results.WAIT_KINDS == {"server_queue"}


@pytest.mark.parametrize("algorithm", ["splitlora", "hsplitlora", "fedlora", "cenlora"])
def test_a_run_writes_the_tables_the_contract_declares(tmp_path, algorithm):
    scenario = load_scenario(TINY, [f"output.dir={tmp_path}", f"algorithm.name={algorithm}",
                                    "runtime.timing_only=true"])
    run_dir = run_scenario(scenario, progress=False)
    tables = {name: pd.read_parquet(run_dir / f"{name}.parquet")
              for name in ("rounds", "events", "clients", "resources")}
    assert tuple(tables["rounds"].columns) == results.ROUND_COLUMNS
    assert tuple(tables["events"].columns) == results.EVENT_COLUMNS
    assert tuple(tables["clients"].columns) == results.CLIENT_COLUMNS
    assert tuple(tables["resources"].columns) == results.RESOURCE_COLUMNS
    assert set(tables["events"]["kind"]) <= set(results.EVENT_KINDS)
    assert set(tables["events"]["resource"]) <= set(tables["resources"]["resource"])
    assert set(tables["resources"]["kind"]) <= set(results.RESOURCE_KINDS)
    assert {p.stem for p in run_dir.glob("*.parquet")} <= set(results.TABLES)
    assert json.loads((run_dir / "summary.json").read_text())["results_version"] == results.RESULTS_VERSION


def test_time_to_target_is_the_first_time_perplexity_reaches_it():
    rounds = pd.DataFrame({"sim_time_s": [0.0, 5.0, 9.0], "eval_ppl": [80.0, 40.0, 30.0]})
    assert results.time_to_target(rounds, 40.0) == 5.0
    assert results.time_to_target(rounds, 90.0) == 0.0
    assert pd.isna(results.time_to_target(rounds, 10.0)) and pd.isna(results.time_to_target(rounds, float("nan")))


def test_time_to_target_is_interpolated_in_log_perplexity_between_evaluations():
    # 80 -> 20 over 4 s; 40 is halfway in log perplexity (ln 80 - ln 40 = ln 40 - ln 20), so 2 s after the first.
    rounds = pd.DataFrame({"round": [0, 1, 2, 3], "sim_time_s": [1.0, 5.0, 7.0, 9.0],
                           "eval_ppl": [80.0, 20.0, float("nan"), 50.0]})
    assert results.time_to_target(rounds, 40.0) == pytest.approx(3.0)
    # The first crossing counts, not a later rise above and fall below; rounds without evaluation are skipped.
    assert results.time_to_target(rounds, 60.0) == pytest.approx(1.0 + 4.0 * math.log(80 / 60) / math.log(4))
