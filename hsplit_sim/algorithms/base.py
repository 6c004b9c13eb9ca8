"""What every algorithm gets (the run context) and owes (setup, a round as a SimPy process, evaluation)."""

from dataclasses import dataclass, field

import numpy as np

from hsplit_sim import costs
from hsplit_sim.errors import RunError
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime.wire import Message
from hsplit_sim.scenario.schema import ClientSpec, Scenario
from hsplit_sim.sim import Simulation


@dataclass
class RoundStats:
    """What one round adds to the rounds table besides evaluation."""

    losses: list[float] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    agg_error: float = float("nan")


@dataclass
class RunContext:
    """What an algorithm works with. In timing-only mode there are no workers (server is None, `real` is
    False): the same SimPy processes run, skipping every real call, with bytes and FLOPs from the cost model,
    and partitions are only sizes (`partition_sizes`)."""

    scenario: Scenario
    spec: costs.ModelSpec
    clients: list[ClientSpec]
    server_device: object
    sim: Simulation
    server: WorkerConnection | None
    client_workers: list[WorkerConnection]
    partitions: list[np.ndarray] | None
    stats: RoundStats = field(default_factory=RoundStats)
    partition_sizes: list[int] | None = None
    replay: object = None  # experiment.trajectory.Replay of a trained run, when re-timing it

    def __post_init__(self):
        if self.partition_sizes is None:
            self.partition_sizes = [len(p) for p in self.partitions]

    @property
    def real(self) -> bool:
        """Whether workers train for real (False: timing-only)."""
        return self.server is not None

    def worker_of(self, client: int) -> WorkerConnection:
        """Clients are dealt to client workers in turn."""
        return self.client_workers[client % len(self.client_workers)]

    @property
    def seq(self) -> int:
        return self.scenario.data.max_length

    @property
    def batch(self) -> int:
        return self.scenario.training.batch_size


def batch_indices(client_indices: np.ndarray, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The batch of a client's global step: consecutive slices of a fresh permutation each epoch."""
    n = len(client_indices)
    if n == 0:
        raise ValueError("batch_indices: the client has no examples")
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    batch = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n)
        batch[epochs == epoch] = np.asarray(client_indices)[order[offsets[epochs == epoch]]]
    return batch


def ranks_to_wire(ranks: costs.Ranks) -> list:
    """[layer, module, rank] triples: JSON keys cannot be integers."""
    return [[layer, module, rank] for layer, modules in sorted(ranks.items()) for module, rank in sorted(modules.items())]


def check_equal(real, predicted, what: str) -> None:
    """A quantity of real tensors (bytes, FLOPs of a rule) must equal the cost model's: a mismatch is a bug."""
    if real != predicted:
        raise RunError(f"{what}: the cost model predicted {predicted} but the real tensors gave {real}")


def checked_bytes(message: Message, predicted: int, what: str) -> int:
    """The real frame bytes, which must equal the cost model's prediction: a mismatch is a bug."""
    if message.payload_bytes != predicted:
        raise RunError(f"{what}: the cost model predicted {predicted} bytes but the real frames carried "
                       f"{message.payload_bytes}")
    return message.payload_bytes


class Algorithm:
    """An algorithm configures clients, runs a round's protocol as a SimPy process, and evaluates."""

    name: str

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    @classmethod
    def check_memory(cls, scenario: Scenario, spec: costs.ModelSpec, clients: list[ClientSpec], server_device) -> None:
        """Raise a ScenarioError if a device cannot hold what this algorithm asks of it (before the run)."""
        raise NotImplementedError

    def setup(self) -> None:
        raise NotImplementedError

    def round(self, round_index: int):
        raise NotImplementedError

    def eval_adapters(self) -> list[str]:
        """The server worker's adapters that make up the global model (none: the base weights are it)."""
        raise NotImplementedError

    order_sensitive = False  # clients share state updated in simulated-time order (SplitLoRA's server adapter)

    def evaluate(self) -> float:
        if not self.ctx.real:
            return float("nan")
        reply = self.ctx.server.call("evaluate", args={"adapters": self.eval_adapters(), "batch_size": self.ctx.batch})
        return reply.header["result"]["loss"]

    def generate(self) -> dict:
        """Test MRs, their references and the global model's greedy generations."""
        reply = self.ctx.server.call("generate", args={"adapters": self.eval_adapters(), "batch_size": 16})
        return reply.header["result"]

    def client_rows(self, round_index: int) -> list[dict]:
        raise NotImplementedError

    def tables(self) -> dict[str, list[dict]]:
        """Further tables of the run directory, by name (HSplitLoRA's importance per weight and round)."""
        return {}

    def client_adapter(self, client: int) -> str:
        """The name of a client's adapter on its worker."""
        return f"c{client}"

    def adapter_bytes(self, client: int) -> int:
        """The cost model's size of a client's adapter (what it uploads)."""
        raise NotImplementedError

    def upload_adapter(self, round_index: int, client, into: dict):
        """The client's adapter goes up its link to the aggregator."""
        ctx, k = self.ctx, client.index
        nbytes = self.adapter_bytes(k)
        if ctx.real:
            reply = ctx.worker_of(k).call("get_adapter", client=k, args={"adapter": self.client_adapter(k)})
            checked_bytes(reply, nbytes, "adapter upload")
            into[k] = dict(reply.tensors)
        ctx.stats.bytes_up += nbytes
        yield from ctx.sim.hold(round_index, k, "adapter_upload", f"client{k}.up",
                                costs.transfer_seconds(nbytes, client.link.up_mbps, client.link.latency_ms),
                                nbytes=nbytes)

    def compute_seconds(self, flops: float, device) -> float:
        return costs.compute_seconds(flops, device.tflops, device.efficiency)
