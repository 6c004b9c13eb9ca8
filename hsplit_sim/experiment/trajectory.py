"""Trajectory reuse: what can change training (the training key). Replaying a trained run's trajectory is a
backend of its own (hsplit_sim/backends/replay.py).

A change that cannot alter what the model learns (link bandwidths and latencies, device speeds, the
server's device and accelerators, worker layout) needs no new training: a run with the same training key
as a trained run is re-timed instead. It runs timing-only (no workers) under its own system and takes
from the trained run everything training produced: per round train_loss, eval_loss, eval_ppl and
agg_error; generation scores and the generations table; HSplitLoRA's per-round plans (its plans table)
and importance table; HetLoRA's prunes (its plans table).

The training key is a hash of every scenario field that can change training:

- seed, model, data (everything: set, size, partition, lengths, test MRs), algorithm (everything,
  including HSplitLoRA's rank set, thresholds and ablation switches), training (everything);
- the number of clients, each client's memory budget (given, or its device's memory) and simulated precision
  (the bytes of what it holds): they decide SplitLoRA's shared configuration and dropped clients, the
  federated baselines' ranks and HSplitLoRA's ARMSC plans;
- with HSplitLoRA's algorithm.time_budget_s, everything the time model reads of each client's device (peak
  rate at its precision, efficiency, memory bandwidth, launch overhead): the budget bounds its plan;
- runtime.torch_device (CPU and GPU kernels round differently).

- system effects that decide who trains: the dropout probability and the selection (seeded draws); and when
  timing decides who trains (a deadline, availability, over-commitment), everything that sets the timing:
  devices, links, media, the server and the whole system section.

Left out otherwise: names and output, the server's device, precision and accelerators, client devices' speeds
(rates, efficiency, bandwidth, overhead) and names, links, media, jitter and bandwidth traces, and the rest of
runtime (workers, transport, timeouts, timing_only).

One thing the key cannot see: clients taking turns on one shared server-side adapter (SplitLoRA's default,
HSplitLoRA's `server_adapters: shared`) train in the order their server steps happen in simulated time, so
a system change that reorders those steps changes training. A replay of such an algorithm
(`Algorithm.order_sensitive`) compares the order round by round with the trained run's events (the training
rounds: HSplitLoRA's probes in round 0 share no server state) and stops on a difference (backends/replay.py:
ReplayMismatch); the run then fails or trains anew (runtime.replay_fallback). With per-client server-side
adapters HSplitLoRA averages probe measurements in client order, so timing never changes what it learns;
neither does it for the federated and centralised baselines.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from hsplit_sim.algorithms import ALGORITHMS
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario import expanded_clients, resolved_dict
from hsplit_sim.scenario.schema import Scenario

# Raised whenever the code trains differently from the same inputs, so that a replay refuses runs trained before:
# 3 = ARMSC's estimated-time split and adapter budgets, one LoRA scaling for every rank, AdamW kept across
# aggregation; 4 = HetLoRA's rank self-pruning, HSplitLoRA without NAA keeping one global adapter; 5 = HSplitLoRA's
# round 1 planned from a probe before training; 6 = HSplitLoRA's plans (with IWI on) fitted to their probe step's
# memory too; 7 = that memory without the output gradients the probe now scores as they arrive.
KEY_VERSION = 7


def training_inputs(scenario: Scenario) -> dict:
    """Every field that can change what the model learns (module docstring)."""
    data = scenario.model_dump(mode="json")
    system = scenario.system
    return {"version": KEY_VERSION, "seed": data["seed"], "model": data["model"], "data": data["data"],
            "algorithm": data["algorithm"], "training": data["training"],
            "memory_budgets_gb": [c.memory_budget_gb for c in expanded_clients(scenario)],
            "client_precisions": [c.precision for c in expanded_clients(scenario)],
            "client_speeds": [_speed(c) for c in expanded_clients(scenario)]
            if ALGORITHMS[scenario.algorithm.name].device_speeds_matter(scenario.algorithm) else None,
            # Seeded draws of who trains (dropouts, selection) change training whatever the system's speed ...
            "participation": {"dropout": system.dropout, "selection": data["system"]["selection"]}
            if system.dropout or system.selection is not None else None,
            # ... and when timing decides who trains, everything that sets the timing does too.
            "timed_participation": _timing(scenario) if _participation_depends_on_time(system) else None,
            "torch_device": data["runtime"]["torch_device"]}


def _speed(client) -> list:
    """What the time model reads of a client's device."""
    device = client.device
    return [device.peak_tflops(client.precision), device.efficiency, device.memory_bandwidth_gbps,
            device.launch_overhead_us]


def _participation_depends_on_time(system) -> bool:
    """A deadline, going offline, or taking the first updates to arrive makes who trains a matter of timing."""
    return (system.deadline_s is not None or system.availability is not None
            or (system.selection is not None and system.selection.over_commit > 0))


def _timing(scenario: Scenario) -> dict:
    """Everything the simulated durations depend on: devices, links, media, the server and the system (trace
    files by their contents, so moving one changes nothing and editing one does)."""
    resolved = resolved_dict(scenario)
    system = resolved["system"]
    if system["availability"] and system["availability"]["trace"]:
        system["availability"]["trace"] = _digest(system["availability"]["trace"])
    if system["bandwidth_trace"]:
        system["bandwidth_trace"] = _digest(system["bandwidth_trace"])
    return {"clients": resolved["clients"], "server": resolved["server"], "system": system,
            "model": resolved["model"], "data": resolved["data"]}


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def training_key(scenario: Scenario) -> str:
    return hashlib.sha256(json.dumps(training_inputs(scenario), sort_keys=True).encode()).hexdigest()[:16]


def timing_partition_sizes(scenario: Scenario, n_clients: int) -> list[int]:
    """Examples per client without loading data: equal shares of data.train_examples (the first clients get
    one more when it does not divide), which is exactly the IID partition's sizes; for Dirichlet partitions
    it is an approximation (they only feed the clients table's n_examples in timing-only runs). Without
    train_examples (the whole E2E set) the set is read to count it."""
    total = scenario.data.train_examples
    if total is None:
        from hsplit_sim.training.data import load_dataset  # pure Python and numpy, no torch

        train, _ = load_dataset(scenario.data.name, scenario.data.dir, None, 1, scenario.seed)
        total = len(train)
    if total < n_clients:
        raise ScenarioError(f"data.train_examples: {total} examples cannot give each of {n_clients} clients one")
    return [len(part) for part in np.array_split(np.arange(total), n_clients)]
