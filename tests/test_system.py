"""System effects of the fleet, each against a hand-worked example: shared media, bandwidth traces, jitter,
availability, dropout, deadlines and over-commitment, energy; and aggregation over the clients that reported."""

import math

import numpy as np
import pandas as pd
import pytest
import simpy
from durations import seconds, transfer
from hypothesis import given
from hypothesis import strategies as st

from hsplit_sim import costs
from hsplit_sim.backends import TimingBackend
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import DeviceSpec, LinkSpec, model_hf_config, scenario_from_dict
from hsplit_sim.scenario.catalog import PowerSpec
from hsplit_sim.scenario.schema import ClientSpec
from hsplit_sim.sim.effects import BandwidthTrace
from hsplit_sim.sim.energy import round_energy
from hsplit_sim.sim.medium import Channel, fair_rates

BASE = {
    "name": "system",
    "seed": 1,
    "model": {"name": "tiny-gpt2"},
    "data": {"name": "e2e-synthetic", "max_length": 32, "train_examples": 48, "eval_examples": 8},
    "algorithm": {"name": "splitlora", "rank": 4, "alpha": 8, "targets": ["q", "v"], "split_layer": 1},
    "training": {"rounds": 2, "local_steps": 3, "batch_size": 2, "lr": 1e-3},
    "server": {"device": "rtx-3090"},
    "clients": [{"count": 3, "device": "jetson-agx-orin", "link": "wifi-6"},
                {"count": 1, "device": "raspberry-pi-5", "link": "lte"}],
    "runtime": {"timing_only": True},
}


def run(tmp_path, *overrides, base=BASE):
    scenario = scenario_from_dict(base, [f"output.dir={tmp_path}", *overrides], relative_to=tmp_path)
    run_dir = run_scenario(scenario, progress=False)
    return {name: pd.read_parquet(run_dir / f"{name}.parquet")
            for name in ("rounds", "events", "clients", "participation", "energy")}


# --- shared media ----------------------------------------------------------------------------------------------

def finish_times(capacity: float, starts_bits_caps: list[tuple[float, float, float]]) -> list[float]:
    env = simpy.Environment()
    channel, ends = Channel(env, capacity), [None] * len(starts_bits_caps)

    def sender(i, start, bits, cap):
        yield env.timeout(start)
        yield channel.transfer(bits, cap)
        ends[i] = env.now

    for i, flow in enumerate(starts_bits_caps):
        env.process(sender(i, *flow))
    env.run()
    return ends


def test_two_transfers_on_a_medium_take_twice_as_long_as_one():
    alone = finish_times(8e6, [(0, 8e6, 1e9)])
    together = finish_times(8e6, [(0, 8e6, 1e9), (0, 8e6, 1e9)])
    assert alone == pytest.approx([1.0]) and together == pytest.approx([2.0, 2.0])


def test_a_transfer_joining_later_shares_from_then_on():
    # 8 Mbit each at 8 Mbit/s; the second starts at 0.5 s: the first has 4 Mbit left, both then get 4 Mbit/s,
    # so the first ends at 1.5 s and the second, 4 Mbit done by then, has the channel alone: 2.0 s.
    assert finish_times(8e6, [(0, 8e6, 1e9), (0.5, 8e6, 1e9)]) == pytest.approx([1.5, 2.0])


def test_a_capped_transfer_leaves_the_rest_to_the_others():
    # A radio capped at 2 Mbit/s on an 8 Mbit/s medium: the other transfer gets 6 Mbit/s.
    assert finish_times(8e6, [(0, 2e6, 2e6), (0, 6e6, 1e9)]) == pytest.approx([1.0, 1.0])


@given(st.floats(1.0, 1e4), st.lists(st.floats(0.1, 1e4), min_size=1, max_size=8))
def test_fair_rates_are_max_min_fair(capacity, caps):
    rates = fair_rates(capacity, caps)
    assert all(0 <= r <= c * (1 + 1e-9) for r, c in zip(rates, caps))
    assert sum(rates) <= capacity * (1 + 1e-9)
    if sum(caps) > capacity:  # saturated: nothing left over; a flow below its cap gets the largest share
        assert sum(rates) == pytest.approx(capacity)
        share = max(rates)
        assert all(r == pytest.approx(c) or r == pytest.approx(share) for r, c in zip(rates, caps))
    else:
        assert rates == pytest.approx(caps)


def test_clients_behind_one_access_point_upload_slower_together(tmp_path):
    """Three identical clients finish their forward pass together, so their first uploads share the medium
    from start to end: each takes latency + 3 x (bits / capacity), where one alone takes latency + bits /
    capacity (their own links, 100 Mbit/s, are faster than the medium's 20)."""
    medium = ["system.media=[{name: ap, up_mbps: 20, down_mbps: 40}]", "clients.0.medium=ap",
              "clients.0.link={up_mbps: 100, down_mbps: 200, latency_ms: 5}", "clients.1.count=1"]

    def first_upload(*overrides):
        events = run(tmp_path / str(len(overrides)), *medium, *overrides)["events"]
        up = events[(events["kind"] == "upload") & (events["round"] == 1) & (events["client"] == 0)].iloc[0]
        return up["end_s"] - up["start_s"], up["bytes"]

    together, nbytes = first_upload()
    alone, _ = first_upload("clients.0.count=1")
    assert alone == pytest.approx(0.005 + nbytes * 8 / 20e6)
    assert together == pytest.approx(0.005 + 3 * nbytes * 8 / 20e6)


# --- bandwidth traces and jitter -------------------------------------------------------------------------------

def test_a_transfer_across_a_rate_change(tmp_path):
    trace = tmp_path / "rates.csv"
    trace.write_text("client,time_s,up_mbps,down_mbps\n0,0.5,16,16\n")
    rates = BandwidthTrace(str(trace), 1)
    # 8 Mbit from t=0 at 8 Mbit/s until 0.5 s (4 Mbit), the other 4 Mbit at 16 Mbit/s: 0.25 s more.
    assert rates.transfer_end(0, True, 0.0, 8e6, 8.0, 1.0) == pytest.approx(0.75)
    assert rates.transfer_end(0, True, 1.0, 8e6, 8.0, 1.0) == pytest.approx(1.5)
    assert rates.rate_mbps(0, False, 0.2, 8.0) == 8.0 and rates.rate_mbps(0, False, 0.6, 8.0) == 16.0


def test_uploads_follow_the_bandwidth_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a trace named on the command line is found from the working directory
    (tmp_path / "rates.csv").write_text("client,time_s,up_mbps,down_mbps\n3,0,1,40\n")
    events = run(tmp_path, "system.bandwidth_trace=rates.csv")["events"]
    pi = events[(events["client"] == 3) & (events["kind"] == "upload")]
    latency = 0.04  # LTE
    assert np.allclose(pi["end_s"] - pi["start_s"], latency + pi["bytes"] * 8 / 1e6)


def test_jitter_scales_each_clients_compute_and_rates_by_its_round_factor(tmp_path):
    from hsplit_sim.scenario import DEVICES
    from hsplit_sim.sim.effects import SystemEffects

    jitter = "system.jitter={compute_sigma: 0.3, bandwidth_sigma: 0.5}"
    events = run(tmp_path, jitter)["events"]
    scenario = scenario_from_dict(BASE, [jitter])
    effects = SystemEffects(scenario.system, scenario.seed, 4)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    for round_index in (1, 2):
        compute, bandwidth = effects.factors(round_index, 3)
        mine = events[(events["round"] == round_index) & (events["client"] == 3)]
        fwd, up = mine[mine["kind"] == "client_fwd"], mine[mine["kind"] == "upload"]
        forward = costs.segment_work(spec, 0, 1, 2, 32, costs.uniform_ranks(spec, ["q", "v"], [0], 4), False, False)[0]
        assert np.allclose(fwd["end_s"] - fwd["start_s"], seconds(forward, DEVICES["raspberry-pi-5"]) * compute)
        assert np.allclose(up["end_s"] - up["start_s"], transfer(int(up["bytes"].iloc[0]), 10 * bandwidth, 40))
    assert effects.factors(1, 3) != effects.factors(2, 3) != (1.0, 1.0)


# --- who trains ----------------------------------------------------------------------------------------------------

def outcomes(participation: pd.DataFrame, round_index: int) -> dict[int, str]:
    rows = participation[participation["round"] == round_index]
    return dict(zip(rows["client"], rows["outcome"]))


def test_a_deadline_drops_the_straggler_and_closes_the_round(tmp_path):
    free = run(tmp_path / "free")
    fast_done = free["participation"].query("round == 1 and client < 3")["end_s"].max()
    slow_done = free["participation"].query("round == 1 and client == 3")["end_s"].max()
    deadline = (fast_done + slow_done) / 2
    tables = run(tmp_path / "deadline", f"system.deadline_s={deadline}")
    assert outcomes(tables["participation"], 1) == {0: "reported", 1: "reported", 2: "reported", 3: "late"}
    events = tables["events"]
    pi = events[(events["round"] == 1) & (events["client"] == 3)]
    work = pi[pi["kind"] != "broadcast"]  # it receives the round's result like every client that trained
    assert work["end_s"].max() <= deadline + 1e-9  # its activities stop at the deadline (the last one cut short)
    assert "adapter_upload" not in set(pi["kind"])
    aggregate = events[(events["round"] == 1) & (events["kind"] == "aggregate")]
    assert aggregate["start_s"].iloc[0] == pytest.approx(deadline)


def test_over_commitment_aggregates_the_first_updates(tmp_path):
    tables = run(tmp_path, "system.selection={clients_per_round: 2, over_commit: 0.5}")
    for round_index in (1, 2):
        got = outcomes(tables["participation"], round_index)
        assert sorted(got.values()).count("reported") == 2
        assert sum(v in ("reported", "late") for v in got.values()) == 3  # ceil(2 x 1.5) selected
        assert sum(v == "not selected" for v in got.values()) == 1


def test_dropout_is_seeded_partial_and_excluded(tmp_path):
    tables = run(tmp_path, "system.dropout=0.5", "training.rounds=4")
    again = run(tmp_path / "again", "system.dropout=0.5", "training.rounds=4")
    pd.testing.assert_frame_equal(tables["participation"], again["participation"])
    participation, events = tables["participation"], tables["events"]
    dropped = participation[participation["outcome"] == "dropped"]
    assert 0 < len(dropped) < len(participation)
    for row in dropped.itertuples():
        mine = events[(events["round"] == row.round) & (events["client"] == row.client)]
        assert (mine["kind"] == "client_fwd").sum() < 3 and "adapter_upload" not in set(mine["kind"])


def test_clients_offline_at_the_start_sit_the_round_out_and_catch_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "online.csv").write_text("client,start_s,end_s\n1,0.001,1000\n")
    tables = run(tmp_path, "system.availability={trace: online.csv}", "algorithm.name=fedlora")
    assert outcomes(tables["participation"], 1)[1] == "offline"
    assert outcomes(tables["participation"], 2)[1] == "reported"
    events = tables["events"]
    first = events[(events["client"] == 1)]
    assert set(first[first["round"] == 1]["kind"]) <= {"eval"}
    # Before training in round 2 it downloads the global adapter it missed.
    second = first[first["round"] == 2].sort_values("start_s")
    assert second["kind"].iloc[0] == "broadcast"


def test_parametric_availability_is_seeded(tmp_path):
    spec = "system.availability={mean_online_s: 0.3, mean_offline_s: 0.3}"
    a, b = run(tmp_path / "a", spec, "training.rounds=6"), run(tmp_path / "b", spec, "training.rounds=6")
    pd.testing.assert_frame_equal(a["participation"], b["participation"])
    assert set(a["participation"]["outcome"]) - {"reported"}


# --- aggregation over the clients that reported --------------------------------------------------------------------

class Recording(TimingBackend):
    """Timing-only, but keeps what each aggregation was asked to combine."""

    def __init__(self):
        self.asked = []

    def contributions(self, clients, active, weights, uploads, server_side):
        self.asked.append((clients, active, np.asarray(weights)))
        return None


@pytest.mark.parametrize("algorithm", ["hsplitlora", "fedlora", "splitlora"])
def test_aggregation_weights_are_renormalised_over_the_clients_that_reported(algorithm, tmp_path, monkeypatch):
    recording = Recording()
    monkeypatch.setattr("hsplit_sim.experiment.run.TimingBackend", lambda: recording)
    tables = run(tmp_path, "system.dropout=0.4", "training.rounds=5", f"algorithm.name={algorithm}")
    participation = tables["participation"]
    sizes = tables["clients"].query("round == 0").set_index("client")["n_examples"]
    for round_index, (clients, active, weights) in enumerate(recording.asked, start=1):
        reported = participation.query(f"round == {round_index} and outcome == 'reported'")["client"].tolist()
        assert clients == reported and set(clients) <= set(active)
        assert weights == pytest.approx(sizes[clients] / sizes[clients].sum())
    assert any(len(clients) < len(active) for clients, active, _ in recording.asked)


# --- energy --------------------------------------------------------------------------------------------------------

def test_energy_is_time_in_each_state_times_its_power():
    device = DeviceSpec(tflops=1, efficiency=1, memory_gb=1, power_w=PowerSpec(compute=10, transmit=3, receive=2,
                                                                               idle=1))
    without = DeviceSpec(tflops=1, efficiency=1, memory_gb=1)
    link = LinkSpec(up_mbps=1, down_mbps=1, latency_ms=0)
    clients = [ClientSpec(0, 0, device, link, 1.0), ClientSpec(1, 0, without, link, 1.0)]
    [row] = round_energy(3, {0: [1.0, 0.5, 0.25], 1: [1.0, 1.0, 1.0]}, clients, 4.0)
    assert (row["round"], row["client"]) == (3, 0)
    assert (row["compute_s"], row["transmit_s"], row["receive_s"], row["idle_s"]) == (1.0, 0.5, 0.25, 2.25)
    assert row["energy_j"] == pytest.approx(10 * 1 + 3 * 0.5 + 2 * 0.25 + 1 * 2.25)


def test_every_run_writes_energy_for_devices_with_power_figures(tmp_path):
    """The busy seconds the fleet counts equal those of the events on each client's own resources, on the fast
    path (private links) and the stepwise one (a deadline that cuts work short)."""
    for overrides in ([], ["system.deadline_s=0.1"]):
        tables = run(tmp_path / str(len(overrides)), *overrides)
        energy, events = tables["energy"], tables["events"]
        assert set(energy["client"]) == {0, 1, 2, 3} and (energy["energy_j"] > 0).all()
        rounds = tables["rounds"].set_index("round")["sim_time_s"]
        spent = energy[["compute_s", "transmit_s", "receive_s", "idle_s"]].sum(axis=1)
        assert np.allclose(spent, [rounds[r] - rounds[r - 1] for r in energy["round"]])
        for state, suffix in (("compute_s", ""), ("transmit_s", ".up"), ("receive_s", ".down")):
            for client in range(4):
                mine = events[events["resource"] == f"client{client}{suffix}"]
                assert math.isclose(energy.query(f"client == {client}")[state].sum(),
                                    (mine["end_s"] - mine["start_s"]).sum(), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("algorithm", ["hsplitlora", "fedlora"])
def test_real_aggregation_combines_exactly_the_reported_updates(algorithm, tmp_path, monkeypatch):
    """Trained for real with dropouts: each round's rule gets the adapters of the clients that reported, and
    its update equals the exact weighted sum of theirs (NAA: to float rounding; FedLoRA: its FedAvg of the
    factors, against the same sum)."""
    from hsplit_sim.algorithms.aggregation import exact_update, relative_error
    from hsplit_sim.backends.real import RealBackend

    seen = []
    aggregate = RealBackend.aggregate

    def recording(self, algorithm, contributions, planned):
        outcome = aggregate(self, algorithm, contributions, planned)
        adapters = []
        for k in contributions.clients:
            adapter = dict(contributions.client_side[k])
            adapter.update(contributions.server_side.get(f"s{k}", {}))
            adapters.append(adapter)
        exact = exact_update(adapters, contributions.weights, algorithm.config.scaling, algorithm.config.contributors)
        seen.append((list(contributions.clients), relative_error(outcome.used, exact)))
        return outcome

    monkeypatch.setattr(RealBackend, "aggregate", recording)
    # HSplitLoRA with one server-side adapter per client: each reported client's update is its own two sides.
    per_client = ["algorithm.server_adapters=per_client"] if algorithm == "hsplitlora" else []
    tables = run(tmp_path, "runtime.timing_only=false", "system.dropout=0.4", "training.rounds=3",
                 f"algorithm.name={algorithm}", "training.local_steps=2", *per_client)
    participation = tables["participation"]
    for round_index, (clients, error) in enumerate(seen, start=1):
        assert clients == participation.query(f"round == {round_index} and outcome == 'reported'")["client"].tolist()
        assert error < (1e-6 if algorithm == "hsplitlora" else 0.5)
    assert any(len(clients) < 4 for clients, _ in seen)
    assert tables["rounds"]["eval_ppl"].notna().all()


def test_trace_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    import yaml

    from hsplit_sim.experiment.sweep import load_sweep_file
    from hsplit_sim.scenario import load_scenario

    study, sweeps = tmp_path / "study", tmp_path / "sweeps"
    study.mkdir(), sweeps.mkdir()
    (study / "rates.csv").write_text("client,time_s,up_mbps,down_mbps\n0,1,5,5\n")
    (study / "base.yaml").write_text(yaml.safe_dump({**BASE, "system": {"bandwidth_trace": "rates.csv"}}))
    (sweeps / "sweep.yaml").write_text(yaml.safe_dump({"base": "../study/base.yaml",
                                                        "grid": {"system.dropout": [0.0, 0.1]}}))
    monkeypatch.chdir(tmp_path)
    assert load_scenario(study / "base.yaml").system.bandwidth_trace == str(study / "rates.csv")
    for point in load_sweep_file(sweeps / "sweep.yaml").points:
        assert point.scenario["system"]["bandwidth_trace"] == str(study / "rates.csv")


def test_when_timing_decides_who_trains_the_training_key_holds_the_whole_system(tmp_path, monkeypatch):
    from hsplit_sim.experiment.trajectory import training_key

    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "online.csv"
    trace.write_text("client,start_s,end_s\n1,0.5,100\n")

    def key(*overrides):
        return training_key(scenario_from_dict(BASE, [*overrides]))

    assert key() == key("clients.0.link=wifi-5") == key("system.jitter={compute_sigma: 0.2}")
    assert key() != key("system.dropout=0.1")
    deadline = key("system.deadline_s=1")
    assert deadline != key("system.deadline_s=1", "clients.0.link=wifi-5")
    with_trace = key("system.availability={trace: online.csv}")
    moved = tmp_path / "elsewhere.csv"
    moved.write_text(trace.read_text())
    assert key("system.availability={trace: elsewhere.csv}") == with_trace
    trace.write_text("client,start_s,end_s\n1,0.6,100\n")
    assert key("system.availability={trace: online.csv}") != with_trace


def test_a_round_with_nobody_online_waits_for_the_first_to_come_online(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "online.csv").write_text("client,start_s,end_s\n" + "".join(f"{k},{2 + k},1000\n" for k in range(4)))
    tables = run(tmp_path, "system.availability={trace: online.csv}")
    first = tables["participation"].query("round == 1")
    assert set(first.query("outcome == 'reported'")["client"]) == {0}  # online from 2 s; the others later
    events = tables["events"].query("round == 1 and kind == 'client_fwd'")
    assert events["start_s"].min() == pytest.approx(2.0)


def test_next_online_time_is_the_first_switch_to_online():
    from hsplit_sim.scenario.schema import Availability
    from hsplit_sim.sim.effects import Availability as Model

    model = Model(Availability(mean_online_s=1.0, mean_offline_s=2.0), seed=4, n_clients=3)
    for client in range(3):
        for t in np.linspace(0, 20, 41):
            if model.online(client, t):
                continue
            wake = model.next_online(client, t)
            assert wake > t and model.online(client, wake) and not model.online(client, wake - 1e-9)
            grid = np.linspace(t, wake, 50, endpoint=False)
            assert not any(model.online(client, s) for s in grid)


def test_the_simulation_pauses_the_garbage_collector_and_gives_it_back():
    """Simulation.run pauses Python's cyclic collector while it runs (engine.py says why) and restores the
    caller's setting however the run ends."""
    import gc

    from hsplit_sim.sim import Simulation

    seen = []

    def process(sim, fail):
        seen.append(gc.isenabled())
        yield sim.env.timeout(1.0)
        if fail:
            raise RuntimeError("the run failed")

    assert gc.isenabled()
    sim = Simulation(1)
    sim.run(process(sim, False))
    assert seen == [False] and gc.isenabled()
    sim = Simulation(1)
    with pytest.raises(RuntimeError, match="the run failed"):
        sim.run(process(sim, True))
    assert gc.isenabled()
    gc.disable()
    try:
        Simulation(1).run(process(sim, False))
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_a_client_stopped_between_forward_and_backward_lets_its_forward_go(tmp_path, monkeypatch):
    """Every forward a SplitWork does is followed by its backward or, for a client a deadline stops in between,
    by stop() (which drops what the worker kept for that backward), and nothing comes after a stop."""
    from hsplit_sim.sim.fleet import SplitWork

    calls: dict[tuple[int, int], list[str]] = {}

    class Recording(SplitWork):
        def __init__(self, round_index, client):
            self.log = calls.setdefault((round_index, client), [])

        def forward(self, step, probe):
            self.log.append("forward")

        def server(self, step, probe):
            self.log.append("server")

        def backward(self, step, probe):
            self.log.append("backward")

        def stop(self):
            self.log.append("stop")

    monkeypatch.setattr(TimingBackend, "split_work", lambda self, round_index, client, *args: Recording(
        round_index, client))
    events = run(tmp_path / "free")["events"]
    upload = events.query("round == 1 and client == 3 and kind == 'upload'").iloc[1]  # its second iteration's
    calls.clear()
    run(tmp_path / "deadline", f"system.deadline_s={(upload['start_s'] + upload['end_s']) / 2}")
    assert calls[(1, 3)] == ["forward", "server", "backward", "forward", "stop"]  # stopped during that upload
    for log in calls.values():
        text = " ".join(log)
        assert text.replace("forward server backward", "").replace("forward server stop", "").replace(
            "forward stop", "").strip() == "", log
        assert "stop" not in log[:-1]
