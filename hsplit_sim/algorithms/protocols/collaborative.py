"""The round that split and federated algorithms share: clients train, report their adapters, the server
aggregates, and each client receives what the rule gives it."""

from hsplit_sim.algorithms.aggregation import data_weights
from hsplit_sim.algorithms.base import Algorithm, Outcome, Planned


class Collaborative(Algorithm):
    """Subclasses (the families) say how a client trains; algorithms say how adapters are aggregated and what
    each client receives."""

    def active_clients(self) -> list:
        raise NotImplementedError

    def train(self, round_index: int, client):
        """A client's local training of one round, as a SimPy process."""
        raise NotImplementedError

    def client_adapter(self, client: int) -> str:
        """The name of a client's adapter on its worker."""
        return f"c{client}"

    def adapter_bytes(self, client: int) -> int:
        """The cost model's size of what a client uploads at the end of a round."""
        raise NotImplementedError

    def server_side_adapters(self, clients) -> list[str]:
        """Server-side adapters the aggregation reads (no traffic: they live on the server)."""
        return []

    def planned(self, clients) -> Planned:
        """The aggregation's cost from the plans alone."""
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
        yield fleet.sim.all_of(self.train(round_index, c) for c in clients)
        uploads = [(c.index, self.client_adapter(c.index), self.adapter_bytes(c.index)) for c in clients]
        weights = data_weights([ctx.partition_sizes[c.index] for c in clients])
        contributions = backend.contributions([c.index for c in clients], weights, uploads,
                                              self.server_side_adapters(clients))
        yield fleet.sim.all_of(fleet.clients[k].upload(round_index, "adapter_upload", nbytes)
                               for k, _, nbytes in uploads)
        planned = self.planned(clients)
        outcome = backend.aggregate(self, contributions, planned)
        yield from fleet.server.compute(round_index, "aggregate", planned.flops)
        self.after_aggregation(round_index)
        yield fleet.sim.all_of(self.deliver(round_index, c, planned) for c in self.receivers(clients))
        backend.apply(outcome)
        self.after_round(round_index)

    def receivers(self, clients) -> list:
        """Who receives the aggregation's result: the clients that took part."""
        return clients
