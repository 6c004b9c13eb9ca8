"""HetLoRA's rank self-pruning: the decision as a pure function worked by hand, the tail penalty on the worker,
and a run in which clients' ranks shrink once their tails are pushed small."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hsplit_sim import costs
from hsplit_sim.algorithms.hetlora import pruned_rank, tail_norm, tail_start
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import load_scenario, model_hf_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml"


def module(rank: int, d_in: int = 3, d_out: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((rank, d_in), np.float32), np.zeros((d_out, rank), np.float32)


def test_tail_norm_by_hand():
    # Rank 4 at gamma 0.5: the tail is ranks 2 and 3. ||A[2:]|| = ||(3, 4)|| = 5 and ||B[:, 2:]|| = 2: 10.
    a, b = module(4)
    a[2, 0], a[3, 1], b[1, 3] = 3.0, 4.0, 2.0
    a[0, 0], b[0, 0] = 100.0, 100.0  # the head is not penalised
    # Rank 1: floor(0.5) = 0 is below min_rank 1, so the tail is empty whatever the values.
    c, d = module(1)
    c[0, 0], d[0, 0] = 7.0, 7.0
    adapter = {"x.lora_A.weight": a, "x.lora_B.weight": b, "y.lora_A.weight": c, "y.lora_B.weight": d}
    assert tail_norm(adapter, 0.5) == pytest.approx(10.0)
    assert tail_norm(adapter, 0.5, min_rank=3) == pytest.approx(2.0 * 4.0)  # the tail starts at rank 3
    assert tail_norm({"x.lora_A.weight": a, "x.lora_B.weight": np.zeros_like(b)}, 0.5) == 0.0  # B zero: 0


def test_tail_start_by_hand():
    assert tail_start(16, 0.99, 1) == 15  # 15.84: one rank a prune
    assert tail_start(8, 0.5, 1) == 4
    assert tail_start(3, 0.5, 2) == 2  # floor(1.5) = 1 is below the floor
    assert tail_start(1, 0.99, 1) == 1  # floor(0.99) = 0: nothing left to cut
    assert tail_start(2, 0.5, 4) == 2  # under the floor already: the rank stays


def test_pruning_decision_by_hand():
    assert pruned_rank(16, tail=0.1, reference=0.2, gamma=0.99, min_rank=1) == 15
    assert pruned_rank(16, tail=0.2, reference=0.2, gamma=0.99, min_rank=1) == 16  # not smaller: kept
    assert pruned_rank(16, tail=0.3, reference=0.2, gamma=0.99, min_rank=1) == 16
    assert pruned_rank(16, tail=0.0, reference=None, gamma=0.99, min_rank=1) == 16  # nothing to compare with
    assert pruned_rank(8, tail=0.0, reference=1e-9, gamma=0.5, min_rank=1) == 4
    assert pruned_rank(8, tail=0.0, reference=1.0, gamma=0.5, min_rank=6) == 6
    assert pruned_rank(1, tail=0.0, reference=1.0, gamma=0.99, min_rank=1) == 1  # never below min_rank
    # A fresh adapter's tail is 0 (B zero): against it, the first round never prunes.
    assert pruned_rank(16, tail=0.5, reference=0.0, gamma=0.99, min_rank=1) == 16


LAMBDA = 100.0


@pytest.fixture(scope="module")
def pruning(tmp_path_factory):
    """A HetLoRA run whose tail penalty is large enough to push the clients' tails below what they received,
    and its replay under the same system."""
    out = tmp_path_factory.mktemp("hetlora")
    common = [f"output.dir={out}", "algorithm.name=hetlora", "algorithm.rank_set=[0,4,8]",
              f"algorithm.pruning_lambda={LAMBDA}", "training.rounds=3", "training.lr=0.01", "data.train_examples=32"]
    sc = load_scenario(TINY, common)
    trained = run_scenario(sc, progress=False)
    replayed = run_scenario(load_scenario(TINY, [*common, f"runtime.replay_from={trained}"]), progress=False)
    return sc, trained, replayed


def test_ranks_shrink_when_tails_are_pushed_small(pruning):
    sc, trained, _ = pruning
    plans = pd.read_parquet(trained / "plans.parquet")
    clients = pd.read_parquet(trained / "clients.parquet")
    rounds = pd.read_parquet(trained / "rounds.parquet")
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    start = plans[plans["round"] == 1]
    assert len(start) == 3 and start["tail_norm"].isna().all()
    changes = plans[plans["round"] > 1]
    assert not changes.empty, "no client pruned"
    rank = {int(k): 8 for k in start["client"]}
    for row in changes.sort_values("round").itertuples():
        ranks = {r for _, _, r in json.loads(row.client_ranks)}
        assert len(ranks) == 1
        new = ranks.pop()
        assert new == tail_start(rank[row.client], sc.algorithm.pruning_gamma, 1) < rank[row.client]  # floor(0.99 r)
        assert row.tail_norm < row.reference_norm  # the decision the row records
        assert row.round >= 3  # round 1 compares with a fresh adapter's tail, 0
        # the clients table shows the new rank from the round the plan names on
        later = clients[(clients["client"] == row.client) & (clients["round"] >= row.round)]
        assert (later["rank"] == new).all()
        assert (clients[(clients["client"] == row.client) & (clients["round"] == row.round - 1)]["rank"]
                == rank[row.client]).all()
        rank[row.client] = new
    # The client pruned before it uploaded: the round's upload already has the new rank.
    events = pd.read_parquet(trained / "events.parquet")
    per_rank = costs.adapter_bytes(spec, costs.uniform_ranks(spec, sc.algorithm.targets, range(spec.n_layers), 1))
    for row in changes.itertuples():
        upload = events[(events["round"] == row.round - 1) & (events["client"] == row.client)
                        & (events["kind"] == "adapter_upload")]
        assert upload["bytes"].tolist() == [per_rank * rank_at(changes, row.client, row.round)]
    assert rounds["eval_loss"].notna().all() and (rounds["agg_error"][1:] > 0).all()


def rank_at(changes: pd.DataFrame, client: int, round_index: int) -> int:
    row = changes[(changes["client"] == client) & (changes["round"] == round_index)].iloc[0]
    return json.loads(row["client_ranks"])[0][2]


def test_a_replay_prunes_where_the_trained_run_did(pruning):
    _, trained, replayed = pruning
    for table in ("events", "clients"):
        pd.testing.assert_frame_equal(pd.read_parquet(trained / f"{table}.parquet"),
                                      pd.read_parquet(replayed / f"{table}.parquet"))
    a, b = pd.read_parquet(trained / "plans.parquet"), pd.read_parquet(replayed / "plans.parquet")
    measured = ["tail_norm", "reference_norm"]  # what decided it was measured by the trained run only
    pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured))
    assert b[measured].isna().all().all()
