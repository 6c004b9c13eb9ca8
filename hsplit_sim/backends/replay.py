"""Replay: a trained run's trajectory re-timed under another system. Nothing trains (as in timing-only); the
accuracy columns, generation scores and HSplitLoRA's plans (and HetLoRA's prunes) come from the trained run's
directory.

Projection (ProjectionBackend) goes further: the trained run's accuracy round by round beside the per-round times
of the same algorithm under another scenario, whose model may differ (a config-only LLaMA-2-7B). That carries an
assumption the replay does not: that the other model needs as many rounds to each accuracy. The other scenario
plans for itself, and nothing is checked against the trained run but its algorithm and round count.

Whether the two runs share a training key is checked by the caller (experiment/trajectory.py), which knows what
can change training. What the key cannot see: clients taking turns on one shared server-side adapter train in
the order their server steps happen in simulated time, so a system change that reorders them changes
training. For such algorithms every round's server order is compared with the trained run's events, and a
difference stops the replay (ReplayMismatch).
"""

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from hsplit_sim.algorithms.plans import ClientPlan
from hsplit_sim.backends import TimingBackend
from hsplit_sim.errors import RunError, ScenarioError

ACCURACY_COLUMNS = ("train_loss", "eval_loss", "eval_ppl", "agg_error")
COPIED_TABLES = ("generations", "importance")  # what training wrote besides the rounds' accuracy


class ReplayMismatch(RunError):
    """The re-timed run would not train as the trained run did (the server order differs)."""

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir


def trained_summary(run_dir: Path, field: str) -> dict:
    """The summary of a completed trained run; a ScenarioError naming `field` otherwise."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise ScenarioError(f"{field}: {run_dir} is not a run directory (no summary.json)")
    summary = json.loads(summary_file.read_text())
    if summary.get("status") != "completed" or summary.get("trajectory") != "trained":
        raise ScenarioError(f"{field}: {run_dir} is not a completed trained run "
                            f"(status {summary.get('status')}, trajectory {summary.get('trajectory')})")
    return summary


def _trained_outputs(run_dir: Path, summary: dict, tables: tuple[str, ...]) -> tuple[dict, dict]:
    """The tables of `tables` the trained run wrote, and its generation scores."""
    found = {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in tables
             if (run_dir / f"{name}.parquet").is_file()}
    return found, {k: summary[k] for k in ("generation", "generation_unavailable") if k in summary}


def _accuracy_by_round(run_dir: Path) -> dict[int, dict[str, float]]:
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    return {int(r["round"]): {c: float(r[c]) for c in ACCURACY_COLUMNS} for _, r in rounds.iterrows()}


class ReplayBackend(TimingBackend):
    """A trained run's record, read from its run directory."""

    trajectory = "retimed"

    def __init__(self, run_dir: str | Path, training_key: str):
        self.run_dir = run_dir = Path(run_dir)
        self.summary = trained_summary(run_dir, "runtime.replay_from")
        if self.summary.get("training_key") != training_key:
            raise ScenarioError(f"runtime.replay_from: {run_dir} trained under training key "
                                f"{self.summary.get('training_key')}, this scenario's is {training_key}: something "
                                f"that can change training differs, so it must train")
        self.rounds = _accuracy_by_round(run_dir)
        self.plans_by_round: dict[int, list[dict]] = {}
        if (run_dir / "plans.parquet").is_file():
            for row in pd.read_parquet(run_dir / "plans.parquet").to_dict("records"):
                self.plans_by_round.setdefault(int(row["round"]), []).append(row)
        self._order: dict[int, list[int]] | None = None

    def plans(self, round_index: int, proposed: list, previous: list) -> list:
        """The plans in force from round_index: the previous ones, changed where the trained run changed them."""
        plans = list(previous)
        for row in self.plans_by_round.get(round_index, []):
            plans[int(row["client"])] = ClientPlan.from_row(row)
        return plans

    def round_done(self, round_index: int, events: Iterable[tuple], order_sensitive: bool) -> dict:
        if order_sensitive:
            self.check_order(round_index, events)
        if round_index not in self.rounds:
            raise ReplayMismatch(f"replay: {self.run_dir} has no round {round_index}")
        return dict(self.rounds[round_index])

    def server_order(self, round_index: int) -> list[int]:
        """Clients in the order they took the server in the trained run (server_queue rows in record order)."""
        if self._order is None:
            events = pd.read_parquet(self.run_dir / "events.parquet", columns=["round", "client", "kind"])
            queue = events[events["kind"] == "server_queue"]
            self._order = {int(r): group["client"].tolist() for r, group in queue.groupby("round", sort=False)}
        return self._order.get(round_index, [])

    def check_order(self, round_index: int, events: Iterable[tuple]) -> None:
        mine = [e[1] for e in events if e[0] == round_index and e[2] == "server_queue"]
        theirs = self.server_order(round_index)
        if mine != theirs:
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise ReplayMismatch(f"replay: round {round_index}: clients take the shared server adapter in another "
                                 f"order than in {self.run_dir} (from server step {first} on), so training would "
                                 f"differ")

    def outputs(self, adapters) -> tuple[dict, dict]:
        """What training wrote besides the rounds (generations, importance) and the generation scores."""
        return _trained_outputs(self.run_dir, self.summary, COPIED_TABLES)


class ProjectionBackend(TimingBackend):
    """A trained run's accuracy, round by round, under another scenario's timing (module docstring)."""

    trajectory = "projected"
    # What decides what a round learns, compared between the two set-ups (differences)
    COMPARED = ("model", "data.name", "data.max_length", "training.local_steps", "training.batch_size",
                "training.lr", "algorithm")

    def __init__(self, run_dir: str | Path, algorithm: str, rounds: int):
        self.run_dir = run_dir = Path(run_dir)
        self.summary = trained_summary(run_dir, "TRAINED_RUN")
        if self.summary.get("algorithm") != algorithm:
            raise ScenarioError(f"--system: the scenario's algorithm is {algorithm}, the trained run's "
                                f"{self.summary.get('algorithm')}: a projection carries one method's trajectory")
        self.rounds = _accuracy_by_round(run_dir)
        if max(self.rounds) < rounds:
            raise ScenarioError(f"training.rounds: the scenario asks for {rounds} rounds, the trained run has "
                                f"{max(self.rounds)}")

    def differences(self, resolved: dict) -> dict[str, list]:
        """Fields that decide what a round learns, where the projected scenario differs from the trained run:
        [trained, projected] by dotted path (the summary shows them beside the assumption)."""
        trained = yaml.safe_load((self.run_dir / "scenario.resolved.yaml").read_text())
        found = {}
        for path in self.COMPARED:
            theirs, mine = trained, resolved
            for key in path.split("."):
                theirs, mine = (theirs or {}).get(key), (mine or {}).get(key)
            if theirs != mine:
                if isinstance(theirs, dict) and isinstance(mine, dict):
                    found.update({f"{path}.{k}": [theirs.get(k), mine.get(k)]
                                  for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)})
                else:
                    found[path] = [theirs, mine]
        counts = [sum(group.get("count", 1) for group in side.get("clients", [])) for side in (trained, resolved)]
        if counts[0] != counts[1]:
            found["clients"] = counts
        return found

    def round_done(self, round_index, events, order_sensitive) -> dict:
        return dict(self.rounds[round_index])

    def outputs(self, adapters) -> tuple[dict, dict]:
        """The trained model's decodings and scores: what the projection assumes the other model reaches."""
        return _trained_outputs(self.run_dir, self.summary, ("generations",))
