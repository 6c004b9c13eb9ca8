"""Where each client is cut and which weights carry adapters of which rank: the plans algorithms decide."""

import json
from dataclasses import dataclass

from hsplit_sim import costs


@dataclass(frozen=True)
class ClientPlan:
    """A client's split point and ranks per weight on each side; inactive: left out (it cannot hold it)."""

    split: int
    client_ranks: costs.Ranks
    server_ranks: costs.Ranks
    active: bool = True

    def row(self, round_index: int, client: int) -> dict:
        """A row of the plans table (ranks as JSON [layer, module, rank] triples)."""
        return {"round": round_index, "client": client, "split": self.split, "active": self.active,
                "client_ranks": json.dumps(ranks_to_wire(self.client_ranks)),
                "server_ranks": json.dumps(ranks_to_wire(self.server_ranks))}

    @classmethod
    def from_row(cls, row: dict) -> "ClientPlan":
        return cls(int(row["split"]), ranks_from_wire(json.loads(row["client_ranks"])),
                   ranks_from_wire(json.loads(row["server_ranks"])), bool(row["active"]))


def ranks_to_wire(ranks: costs.Ranks) -> list:
    """[layer, module, rank] triples: JSON keys cannot be integers."""
    return [[layer, module, rank] for layer, modules in sorted(ranks.items())
            for module, rank in sorted(modules.items())]


def ranks_from_wire(triples: list) -> costs.Ranks:
    ranks: costs.Ranks = {}
    for layer, module, rank in triples:
        ranks.setdefault(int(layer), {})[module] = int(rank)
    return ranks


def ranks_key(ranks: costs.Ranks) -> tuple:
    """A hashable form of a rank map."""
    return tuple((layer, tuple(sorted(modules.items()))) for layer, modules in sorted(ranks.items()))
