"""Where a run's training happens, behind one interface chosen once per run: real workers (real.py), nowhere
(timing-only: this module's TimingBackend), or a trained run's record (replay.py). The protocols call the same
methods whatever the backend, so no algorithm asks which one it has.
"""

from collections.abc import Iterable

from hsplit_sim.sim.fleet import SplitWork, StepWork


class Backend:
    """The operations of training that protocols ask for. Durations never come from here: the fleet charges
    them from the cost model whatever the backend does."""

    def configure(self, client: int | None, adapter: str, ranks, scaling: float, split: int | None = None,
                  optimizer: dict | None = None, regulariser: dict | None = None) -> None:
        """A fresh adapter (A from the run's seed, B zero) on a client (None: on the server), with an optimiser
        when it trains, and a term its training adds to the loss (HetLoRA's tail penalty: {"weight", "gamma",
        "min_rank"}; none: the plain loss)."""
        raise NotImplementedError

    def reshape(self, client: int | None, adapter: str, ranks, split: int | None = None) -> None:
        """A trained adapter re-created with other ranks (and split), keeping its values and AdamW moments where
        old and new overlap (the leading rows of A and columns of B; training/roles.py: Role.reshape)."""
        raise NotImplementedError

    def adapter(self, client: int | None, adapter: str) -> dict | None:
        """An adapter's values now, as PEFT state-dict arrays (client None: on the server); None where nothing
        trains."""
        raise NotImplementedError

    def setup_full(self, optimizer: dict) -> None:
        """Full fine-tuning of every weight on the server."""
        raise NotImplementedError

    def split_work(self, round_index: int, client: int, adapter: str, server_adapter: str, split: int, costs,
                   measure: str, on_importance) -> SplitWork | None:
        """A client's split iterations of one round (None: nothing but time); probing iterations measure
        importance with `measure` (abs_sum or sum_abs) and hand it to `on_importance(client, scores)`."""
        raise NotImplementedError

    def probe_work(self, client: int, split: int, costs, measure: str, on_importance) -> SplitWork | None:
        """IWI's probe before round 1 for a client: one split iteration of the base model cut at `split`, no
        adapter and no optimiser step, on the batch of its first training step (None: nothing but time)."""
        raise NotImplementedError

    def step_work(self, round_index: int, client: int | None, adapter: str | None, steps: int) -> StepWork | None:
        """Whole-model steps of one round on a client (client None: the server, on the pooled data); None:
        nothing but time."""
        raise NotImplementedError

    def contributions(self, clients: list[int], active: list[int], weights, uploads: list[tuple[int, str, int]],
                      server_side: list[str]):
        """algorithms.base.Contributions of the reporting clients: their uploads (client, adapter, predicted
        bytes) and the server-side adapters named; None when nothing trains."""
        raise NotImplementedError

    def aggregate(self, algorithm, contributions, planned):
        """The algorithm's rule on the contributions (None when nothing trains), checked against `planned`."""
        raise NotImplementedError

    def apply(self, algorithm, outcome) -> None:
        """The aggregation's changes on the workers (clients' adapters by the algorithm's names for them)."""
        raise NotImplementedError

    def evaluate(self, adapters: list[str]) -> float:
        raise NotImplementedError

    def outputs(self, adapters: list[str]) -> tuple[dict, dict]:
        """What the run directory gets once the rounds are done: (tables by name, summary fields): the final
        model's decodings of the test MRs and their scores, where anything trained."""
        raise NotImplementedError

    def plans(self, round_index: int, proposed: list, previous: list) -> list:
        """The plans in force from round_index: the algorithm's proposal, or (a replay) the previous plans
        changed where the trained run changed them."""
        raise NotImplementedError

    def settle(self) -> None:
        """Wait for the work still running on the workers (a round's last deferred steps), so that the round's
        losses are all in; nothing where nothing runs for real."""
        raise NotImplementedError

    def round_done(self, round_index: int, events: Iterable[tuple], order_sensitive: bool) -> dict:
        """Columns of the round's row that come from elsewhere (a replay's accuracy); {} otherwise. `events`
        are the event rows not yet written (Simulation.rows: read them once)."""
        raise NotImplementedError

    def take_host_times(self) -> list[dict]:
        """The host's measured seconds of the real operations since the last call (results.HOST_TIME_COLUMNS);
        [] where nothing runs for real."""
        raise NotImplementedError

    def state(self, put) -> dict[str, dict]:
        """What training holds at a round's end, for a checkpoint: each worker's tensors handed one by one to
        `put(worker name, name, array)`, which keeps nothing of them, and its JSON part returned by worker name;
        {} where nothing trains."""
        raise NotImplementedError

    def restore(self, state: dict[str, tuple[dict, dict]]) -> None:
        """Put back what state() gave, after the algorithm's setup."""
        raise NotImplementedError


class TimingBackend(Backend):
    """Timing-only: nothing trains; every operation is free and returns nothing."""

    def configure(self, client, adapter, ranks, scaling, split=None, optimizer=None, regulariser=None) -> None:
        pass

    def reshape(self, client, adapter, ranks, split=None) -> None:
        pass

    def adapter(self, client, adapter) -> None:
        return None

    def setup_full(self, optimizer) -> None:
        pass

    def split_work(self, round_index, client, adapter, server_adapter, split, costs, measure,
                   on_importance) -> None:
        return None

    def probe_work(self, client, split, costs, measure, on_importance) -> None:
        return None

    def step_work(self, round_index, client, adapter, steps) -> None:
        return None

    def contributions(self, clients, active, weights, uploads, server_side):
        return None

    def aggregate(self, algorithm, contributions, planned):
        return None

    def apply(self, algorithm, outcome) -> None:
        pass

    def evaluate(self, adapters) -> float:
        return float("nan")

    def outputs(self, adapters) -> tuple[dict, dict]:
        return {}, {}

    def plans(self, round_index, proposed, previous) -> list:
        return proposed

    def settle(self) -> None:
        pass

    def round_done(self, round_index, events, order_sensitive) -> dict:
        return {}

    def take_host_times(self) -> list[dict]:
        return []

    def state(self, put) -> dict[str, dict]:
        return {}

    def restore(self, state) -> None:
        pass
