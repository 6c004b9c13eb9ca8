"""The round that split and federated algorithms share: the fleet decides who trains (sim/fleet.py:
participate), each of them trains and uploads its adapter as soon as its local steps are done, the server
aggregates the updates that arrived, and every client that trained receives what the rule gives it.

Aggregation runs over the clients whose updates arrived; their data weights are renormalised over them. A
client that sat a round out (offline, or not selected) catches up before it next trains: it downloads what it
missed (the latest result where a rule replaces adapters, every missed update where a rule merges updates
into the weights).
"""

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import data_weights
from hsplit_sim.algorithms.base import Algorithm, Outcome, Planned


class Collaborative(Algorithm):
    """Subclasses (the families) say how a client trains; algorithms say how adapters are aggregated and what
    each client receives."""

    replaces_adapters = True  # False: the rule merges each round's update into the weights (NAA, FLoRA)
    # Where the rule hands adapters back (replaces_adapters), whether each trained adapter's AdamW state starts
    # again: kept by default, as SplitLoRA's code keeps it across aggregation.
    restarts_optimizer = False
    round_state = ("_missed",)  # what each client that sat rounds out has yet to receive

    def active_clients(self) -> list:
        raise NotImplementedError

    def train(self, round_index: int, client, steps: int, report: int):
        """A client's `steps` local steps of one round, then the upload of its `report` bytes of update (none:
        0): the generator of a SimPy process."""
        raise NotImplementedError

    def client_adapter(self, client: int) -> str:
        """The name of a client's adapter on its worker."""
        return f"c{client}"

    def adapter_bytes(self, client: int) -> int:
        """The cost model's size of what a client uploads at the end of a round, in its precision."""
        raise NotImplementedError

    def host_adapter_bytes(self, client: int) -> int:
        """The same as the host's fp32 tensors, which a real run's upload must match."""
        raise NotImplementedError

    def server_side_adapters(self, clients) -> list[str]:
        """Server-side adapters the aggregation reads (no traffic: they live on the server)."""
        return []

    def planned(self, clients) -> Planned:
        """The aggregation's cost from the plans of the clients that reported."""
        raise NotImplementedError

    def aggregate(self, contributions) -> Outcome:
        """The rule on real adapters (called by the real backend only)."""
        raise NotImplementedError

    def after_aggregation(self, round_index: int) -> None:
        """Decisions for the next round once the update is known (HSplitLoRA's importance and plans)."""

    def deliver(self, round_index: int, client, planned: Planned):
        """What goes down to a client after aggregation, as a SimPy process."""
        raise NotImplementedError

    def after_round(self, round_index: int) -> None:
        """Work on the workers after the update is applied (fresh adapters where a rule merges)."""

    def start_round(self, round_index: int) -> None:
        """Reset what a round collects (HSplitLoRA's importance measurements)."""

    def round(self, round_index: int):
        ctx = self.ctx
        fleet, backend = ctx.fleet, ctx.backend
        clients = self.active_clients()
        self.start_round(round_index)
        missed = self.__dict__.setdefault("_missed", {})

        def client_round(node, steps: int, report: bool):
            """A client's round: what it missed, its local steps, the upload of its update if it reports."""
            client = ctx.clients[node.index]
            work = self.train(round_index, client, steps, self.adapter_bytes(node.index) if report else 0)
            behind = self._catch_up(missed.pop(node.index, []))
            return self._after(round_index, client, behind, work) if behind else work

        taking_part = yield fleet.sim.env.process(
            fleet.participate(round_index, clients, ctx.scenario.training.local_steps, client_round))
        reporting = [ctx.clients[k] for k in taking_part.reported]
        if not reporting:  # nothing arrived: nothing to aggregate
            return
        weights = data_weights([ctx.partition_sizes[c.index] for c in reporting])
        uploads = [(c.index, self.client_adapter(c.index), self.host_adapter_bytes(c.index)) for c in reporting]
        contributions = backend.contributions([c.index for c in reporting], [c.index for c in clients], weights,
                                              uploads, self.server_side_adapters(reporting))
        planned = self.planned(reporting)
        outcome = backend.aggregate(self, contributions, planned)
        yield from fleet.server.compute(round_index, "aggregate", costs.Work.compute_bound(planned.flops))
        self.after_aggregation(round_index)
        yield fleet.sim.all_of(self.deliver(round_index, ctx.clients[k], planned) for k in taking_part.selected)
        selected = set(taking_part.selected)
        for c in clients:
            if c.index not in selected:
                missed.setdefault(c.index, []).append(planned)
        backend.apply(self, outcome)
        self.after_round(round_index)

    def _catch_up(self, missed: list[Planned]) -> list[Planned]:
        return missed[-1:] if self.replaces_adapters else missed

    def _after(self, round_index: int, client, missed: list[Planned], work):
        """`work` once the client has received what it missed."""
        for late in missed:
            yield from self.deliver(round_index, client, late)
        yield from work
