"""HSplitLoRA without NAA (the paper's ablation): one global adapter kept across rounds; each client starts every
round from its truncation, on both sides of the cut; the reported adapters are zero-padded and averaged A and B
apart into it; nothing is merged or re-initialised, and every adapter keeps its AdamW state.

The run's real backend is watched from this process: what each client's adapters hold when its round starts, what
the aggregation read and produced, and every configure, reshape and apply it was asked for."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from test_hsplitlora import base, heterogeneous_budgets

from hsplit_sim.algorithms.aggregation import LORA_A, LORA_B, lora_pairs, relative_error
from hsplit_sim.algorithms.hsplitlora import module_layer
from hsplit_sim.backends.real import RealBackend
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import scenario_from_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOP = 16  # max of the rank set Q = [0, 4, 8, 16]


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    calls: list[tuple] = []  # in order: ("configure" | "reshape", client, adapter), ("start", round, client)
    starts: dict[tuple[int, int], tuple] = {}  # (round, client) -> (client adapter, server adapter name, values)
    aggregations: list = []  # (contributions, outcome, agg_error)
    applies: list = []  # (restarts_optimizer, outcome)
    initial: dict = {}

    originals = {name: getattr(RealBackend, name) for name in
                 ("split_work", "apply", "configure", "reshape", "adapter", "aggregate")}

    def split_work(self, round_index, client, adapter, server_adapter, *args):
        calls.append(("start", round_index, client))
        starts[round_index, client] = (self.adapter(client, adapter), server_adapter,
                                       self.adapter(None, server_adapter))
        return originals["split_work"](self, round_index, client, adapter, server_adapter, *args)

    def aggregate(self, algorithm, contributions, planned):
        outcome = originals["aggregate"](self, algorithm, contributions, planned)
        aggregations.append((contributions, outcome, self.stats.agg_error))
        return outcome

    def apply(self, algorithm, outcome):
        applies.append((algorithm.restarts_optimizer, outcome))
        return originals["apply"](self, algorithm, outcome)

    def configure(self, client, adapter, *args, **kwargs):
        calls.append(("configure", client, adapter))
        return originals["configure"](self, client, adapter, *args, **kwargs)

    def reshape(self, client, adapter, *args, **kwargs):
        calls.append(("reshape", client, adapter))
        return originals["reshape"](self, client, adapter, *args, **kwargs)

    def adapter(self, client, name):
        values = originals["adapter"](self, client, name)
        if name == "global" and not initial:
            initial.update(values)
        return values

    raw = base("tiny-gpt2", heterogeneous_budgets("tiny-gpt2"))
    sc = scenario_from_dict(raw, [f"output.dir={tmp_path_factory.mktemp('no-naa')}", "algorithm.naa=false"])
    with pytest.MonkeyPatch.context() as patch:
        for name, replacement in (("split_work", split_work), ("aggregate", aggregate), ("apply", apply),
                                  ("configure", configure), ("reshape", reshape), ("adapter", adapter)):
            patch.setattr(RealBackend, name, replacement)
        run_dir = run_scenario(sc, progress=False)
    tables = {p.stem: pd.read_parquet(p) for p in run_dir.glob("*.parquet")}
    return sc, tables, calls, starts, aggregations, applies, initial


def plan_in_force(tables, round_index: int, client: int) -> dict:
    plans = tables["plans"]
    rows = plans[(plans["client"] == client) & (plans["round"] <= round_index)].sort_values("round")
    return rows.iloc[-1].to_dict()


def ranks_of(wire: str) -> dict[tuple[int, str], int]:
    return {(layer, module): rank for layer, module, rank in json.loads(wire) if rank > 0}


def key_of(path: str) -> tuple[int, str]:
    layer = module_layer(path)
    return layer, path.split(f".{layer}.", 1)[1]


def truncation(global_adapter: dict, ranks: dict[tuple[int, str], int]) -> dict:
    out = {}
    for path, (a, b) in lora_pairs(global_adapter).items():
        r = ranks.get(key_of(path), 0)
        if r:
            out[path + LORA_A], out[path + LORA_B] = a[:r], b[:, :r]
    return out


def globals_by_round(aggregations) -> dict[int, dict]:
    """The global adapter after each round's aggregation (every round aggregates here: no system effects)."""
    return {r: outcome.server_adapters["global"] for r, (_, outcome, _) in enumerate(aggregations, start=1)}


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_clients_start_each_round_from_the_truncated_global_adapter(watched):
    sc, tables, _, starts, aggregations, _, initial = watched
    assert initial and all(not b.any() for _, b in lora_pairs(initial).values())  # from the seed: B zero
    assert {a.shape[0] for a, _ in lora_pairs(initial).values()} == {TOP}
    global_at = {1: initial, **{r + 1: g for r, g in globals_by_round(aggregations).items()}}
    clients = sorted({k for _, k in starts})
    for (r, k), (client_values, server_name, server_values) in sorted(starts.items()):
        plan = plan_in_force(tables, r, k)
        assert_same(client_values, truncation(global_at[r], ranks_of(plan["client_ranks"])))
        # One shared server-side adapter: every client's server side is a part of one set of ranks.
        assert server_name == "server"
        merged = {}
        for c in clients:
            merged.update(ranks_of(plan_in_force(tables, r, c)["server_ranks"]))
        assert_same(server_values, truncation(global_at[r], merged))
    assert {r for r, _ in starts} == set(range(1, sc.training.rounds + 1))
    # Not fresh adapters: from round 2 on, B carries what the clients learnt where a weight was trained before
    # (ARMSC moves adapters between weights, so a client may also hold a weight nobody has trained yet).
    for r in range(2, sc.training.rounds + 1):
        assert any(np.abs(b).max() > 0 for (rr, _), (values, _, _) in starts.items() if rr == r
                   for _, b in lora_pairs(values).values()), r


def test_the_global_adapter_is_the_padded_average_of_what_was_reported(watched):
    sc, tables, _, _, aggregations, _, initial = watched
    scaling = sc.algorithm.scaling
    previous = initial
    for r, (contributions, outcome, agg_error) in enumerate(aggregations, start=1):
        reporting = contributions.clients
        p = dict(zip(reporting, contributions.weights))
        splits = {k: plan_in_force(tables, r, k)["split"] for k in reporting}
        # (A, B, weight) per module: client sides by data weight; the shared server adapter's block b stands
        # for every reporting client whose server side holds b.
        held: dict[str, list] = {}
        for k in reporting:
            for path, (a, b) in lora_pairs(contributions.client_side[k]).items():
                held.setdefault(path, []).append((a, b, p[k]))
        for path, (a, b) in lora_pairs(contributions.server_side["server"]).items():
            weight = sum(p[k] for k in reporting if splits[k] <= key_of(path)[0])
            if weight > 0:
                held.setdefault(path, []).append((a, b, weight))
        new = outcome.server_adapters["global"]
        exact, used = {}, {}
        for path, (g_a, g_b) in lora_pairs(new).items():
            if path not in held:  # nobody trained it this round: kept
                np.testing.assert_array_equal(g_a, previous[path + LORA_A])
                np.testing.assert_array_equal(g_b, previous[path + LORA_B])
                continue
            total = sum(w for _, _, w in held[path])
            a_sum, b_sum = np.zeros((TOP, g_a.shape[1])), np.zeros((g_b.shape[0], TOP))
            dense = np.zeros((g_b.shape[0], g_a.shape[1]))
            for a, b, w in held[path]:
                for i in range(a.shape[0]):  # zero-padded: ranks past a contributor's own add nothing
                    a_sum[i] += w / total * a[i].astype(np.float64)
                    b_sum[:, i] += w / total * b[:, i].astype(np.float64)
                    dense += w / total * scaling * np.outer(b[:, i], a[i])
            np.testing.assert_allclose(g_a, a_sum, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(g_b, b_sum, rtol=1e-5, atol=1e-7)
            exact[path] = dense
            used[path] = scaling * g_b.astype(np.float64) @ g_a.astype(np.float64)
        # The recorded error is that of the global adapter's update against the exact weighted sum.
        assert agg_error == pytest.approx(relative_error(used, exact), rel=1e-4)
        assert tables["rounds"]["agg_error"][r] == pytest.approx(agg_error, rel=1e-9)
        assert agg_error > 1e-3  # averaging A and B apart is not exact
        assert outcome.merge is None  # nothing goes into the base weights
        previous = new


def test_adapters_persist_with_their_optimiser_state(watched):
    sc, tables, calls, _, _, applies, _ = watched
    assert applies and not any(restarts for restarts, _ in applies)  # set_adapter keeps AdamW state
    first = {}  # round -> index of its first client start in the calls
    for i, call in enumerate(calls):
        if call[0] == "start":
            first.setdefault(call[1], i)
    created = {(client, adapter) for kind, client, adapter in calls[:first[1]] if kind == "configure"}
    assert (None, "global") in created and (None, "server") in created
    n_clients = tables["clients"]["client"].nunique()
    assert all((k, f"c{k}") in created for k in range(n_clients))
    assert not [call for call in calls[first[1]:] if call[0] == "configure"], "an adapter was re-created"
    # A client's adapter is reshaped (moments kept where old and new overlap) exactly when ARMSC changed its plan.
    for r in range(2, sc.training.rounds + 1):
        between = calls[first[r - 1]:first[r]]
        reshaped = {client for kind, client, adapter in between if kind == "reshape" and client is not None}
        changed = {k for k in range(n_clients)
                   if (plan_in_force(tables, r - 1, k)["client_ranks"], plan_in_force(tables, r - 1, k)["split"])
                   != (plan_in_force(tables, r, k)["client_ranks"], plan_in_force(tables, r, k)["split"])}
        assert reshaped == changed, r
    assert tables["clients"]["status"].eq("active").all()
    assert (tables["rounds"]["eval_loss"].iloc[-1] < tables["rounds"]["eval_loss"].iloc[0])
