"""Trajectory reuse: what can change training (the training key), and replaying a trained run's trajectory.

A change that cannot alter what the model learns (link bandwidths and latencies, device speeds, the
server's device and accelerators, worker layout) needs no new training: a run with the same training key
as a trained run is re-timed instead. It runs timing-only (no workers) under its own system and takes
from the trained run everything training produced: per round train_loss, eval_loss, eval_ppl and
agg_error; generation scores and the generations table; HSplitLoRA's per-round plans (its plans table)
and importance table.

The training key is a hash of every scenario field that can change training:

- seed, model, data (everything: set, size, partition, lengths, test MRs), algorithm (everything,
  including HSplitLoRA's rank set, thresholds and ablation switches), training (everything);
- the number of clients and each client's memory budget (given, or its device's memory): budgets decide
  SplitLoRA's shared configuration and dropped clients, the federated baselines' ranks and HSplitLoRA's
  ARMSC plans (which use memory only: the schema has no time budget, so device speeds never enter a plan);
- runtime.torch_device (CPU and GPU kernels round differently).

Left out: names and output, the server's device and accelerators, client devices' speeds (tflops,
efficiency) and names, links, and the rest of runtime (workers, transport, timeouts, timing_only).

One thing the key cannot see: SplitLoRA's clients take turns on one server-side adapter in the order
their server steps happen in simulated time, so a system change that reorders those steps changes
training. A replay of such an algorithm (`Algorithm.order_sensitive`) compares, round by round, the order
of its server steps with the trained run's events; on a difference it stops (ReplayMismatch), and the
run either fails or trains anew (runtime.replay_fallback). HSplitLoRA gives every client its own
server-side adapter and averages probe measurements in client order, so timing never changes what it
learns; neither does it for the federated and centralised baselines.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.scenario import expanded_clients
from hsplit_sim.scenario.schema import Scenario

KEY_VERSION = 1
ACCURACY_COLUMNS = ("train_loss", "eval_loss", "eval_ppl", "agg_error")
COPIED_TABLES = ("generations", "importance")  # what training wrote besides the rounds' accuracy


class ReplayMismatch(RunError):
    """The re-timed run would not train as the trained run did (SplitLoRA's server order differs)."""

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir


def training_inputs(scenario: Scenario) -> dict:
    """Every field that can change what the model learns (module docstring)."""
    data = scenario.model_dump(mode="json")
    return {"version": KEY_VERSION, "seed": data["seed"], "model": data["model"], "data": data["data"],
            "algorithm": data["algorithm"], "training": data["training"],
            "memory_budgets_gb": [c.memory_budget_gb for c in expanded_clients(scenario)],
            # A time budget makes HSplitLoRA's plans depend on each client's compute rate.
            "client_rates": None if scenario.algorithm.time_budget_s is None else
            [c.device.tflops * c.device.efficiency for c in expanded_clients(scenario)],
            "torch_device": data["runtime"]["torch_device"]}


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


class Replay:
    """A trained run's trajectory, read from its run directory."""

    def __init__(self, run_dir: Path, scenario: Scenario):
        self.run_dir = run_dir = Path(run_dir)
        summary_file = run_dir / "summary.json"
        if not summary_file.is_file():
            raise ScenarioError(f"runtime.replay_from: {run_dir} is not a run directory (no summary.json)")
        self.summary = json.loads(summary_file.read_text())
        key = training_key(scenario)
        if self.summary.get("status") != "completed" or self.summary.get("trajectory") != "trained":
            raise ScenarioError(f"runtime.replay_from: {run_dir} is not a completed trained run "
                                f"(status {self.summary.get('status')}, trajectory {self.summary.get('trajectory')})")
        if self.summary.get("training_key") != key:
            raise ScenarioError(f"runtime.replay_from: {run_dir} trained under training key "
                                f"{self.summary.get('training_key')}, this scenario's is {key}: something that can "
                                f"change training differs, so it must train")
        rounds = pd.read_parquet(run_dir / "rounds.parquet")
        self.rounds = {int(r["round"]): {c: float(r[c]) for c in ACCURACY_COLUMNS} for _, r in rounds.iterrows()}
        self.plans_by_round: dict[int, list[dict]] = {}
        if (run_dir / "plans.parquet").is_file():
            for row in pd.read_parquet(run_dir / "plans.parquet").to_dict("records"):
                self.plans_by_round.setdefault(int(row["round"]), []).append(row)
        self._order: dict[int, list[int]] | None = None

    def accuracy(self, round_index: int) -> dict:
        if round_index not in self.rounds:
            raise ReplayMismatch(f"replay: {self.run_dir} has no round {round_index}")
        return dict(self.rounds[round_index])

    def plans_for(self, round_index: int, previous: list) -> list:
        """The plans in force from round_index: the previous ones, changed where the trained run changed them."""
        from hsplit_sim.algorithms.split_protocol import ClientPlan

        plans = list(previous)
        for row in self.plans_by_round.get(round_index, []):
            plans[int(row["client"])] = ClientPlan(int(row["split"]), _ranks(row["client_ranks"]),
                                                   _ranks(row["server_ranks"]), bool(row["active"]))
        return plans

    def server_order(self, round_index: int) -> list[int]:
        """Clients in the order they took the server in the trained run (server_queue rows in record order)."""
        if self._order is None:
            events = pd.read_parquet(self.run_dir / "events.parquet", columns=["round", "client", "kind"])
            queue = events[events["kind"] == "server_queue"]
            self._order = {int(r): group["client"].tolist() for r, group in queue.groupby("round", sort=False)}
        return self._order.get(round_index, [])

    def check_order(self, round_index: int, events: list[tuple]) -> None:
        mine = [e[1] for e in events if e[0] == round_index and e[2] == "server_queue"]
        theirs = self.server_order(round_index)
        if mine != theirs:
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise ReplayMismatch(f"replay: round {round_index}: clients take the shared server adapter in another "
                                 f"order than in {self.run_dir} (from server step {first} on), so training would "
                                 f"differ")

    def copy_tables(self, writer) -> None:
        for name in COPIED_TABLES:
            source = self.run_dir / f"{name}.parquet"
            if source.is_file():
                writer.write_table(name, pd.read_parquet(source))

    def generation(self) -> dict:
        return {k: self.summary[k] for k in ("generation", "generation_unavailable") if k in self.summary}


def _ranks(text: str) -> dict[int, dict[str, int]]:
    ranks: dict[int, dict[str, int]] = {}
    for layer, module, rank in json.loads(text):
        ranks.setdefault(int(layer), {})[module] = int(rank)
    return ranks
