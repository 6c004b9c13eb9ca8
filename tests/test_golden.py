"""Stored runs stay the same: every case of tests/golden/cases.py, rerun, gives the tables stored beside it.

Simulated quantities (times, bytes, FLOPs, plans, the clients table) must match exactly; quantities of real
training (losses, perplexity, aggregation error, importance) to a relative 1e-4, since another CPU may round
float sums differently (an aggregation error of rounding alone, below AGG_ERROR_NOISE, to that absolute).
"""

import numpy as np
import pandas as pd
import pytest
from golden.cases import CASES, TABLES, TIMING_CASES, run, stored

TRAINED = {"rounds": ["train_loss", "eval_loss", "eval_ppl", "agg_error", "wall_time_s"],
           "importance": ["measured", "smoothed"]}
# An exact aggregation's relative error is rounding alone (1e-18 to 1e-7 by rule and CPU): below this it is noise,
# and what the tables must keep is exact against inexact (an inexact rule's error is 1e-3 and more).
AGG_ERROR_NOISE = 1e-6


def compare(name: str, run_dir) -> None:
    for table in TABLES:
        expected_file = stored(name) / f"{table}.parquet"
        produced_file = run_dir / f"{table}.parquet"
        assert expected_file.is_file() == produced_file.is_file(), f"{name}: {table} present in one run only"
        if not expected_file.is_file():
            continue
        expected, produced = pd.read_parquet(expected_file), pd.read_parquet(produced_file)
        assert list(produced.columns) == list(expected.columns), f"{name}: {table} columns"
        assert len(produced) == len(expected), f"{name}: {table} rows"
        trained = [c for c in TRAINED.get(table, []) if c in expected]
        pd.testing.assert_frame_equal(produced.drop(columns=trained), expected.drop(columns=trained),
                                      check_exact=True, obj=f"{name}: {table}")
        for column in trained:
            if column == "wall_time_s":
                continue
            np.testing.assert_allclose(produced[column], expected[column], rtol=1e-4, equal_nan=True,
                                       atol=AGG_ERROR_NOISE if column == "agg_error" else 0,
                                       err_msg=f"{name}: {table}.{column}")


@pytest.mark.parametrize("name", list(TIMING_CASES))
def test_timing_only_fleet_tables_are_unchanged(name, tmp_path):
    compare(name, run(name, tmp_path))


@pytest.mark.parametrize("name", list(CASES))
def test_trained_tables_are_unchanged(name, tmp_path):
    compare(name, run(name, tmp_path))
