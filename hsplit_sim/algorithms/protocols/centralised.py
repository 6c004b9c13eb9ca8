"""Centralised baselines: the server trains on the data of every client pooled.

Before the first step every client uploads its training partition over its own link (once: the server keeps
it), so the pooled data is not free; then simulated time is the server's compute. Each round takes as many
steps as all clients together take in a split round, so rounds see the same number of examples.
"""

from hsplit_sim import costs
from hsplit_sim.algorithms.base import Algorithm, server_placement
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.catalog import resolve_device
from hsplit_sim.scenario.load import server_precision
from hsplit_sim.scenario.schema import ELEMENT_BYTES

GB = 1e9


class CentralisedProtocol(Algorithm):
    """Subclasses say which weights train: adapters of one rank (`ranks`), or every weight (full_finetune)."""

    family = "centralised"
    full_finetune = False
    adapter: str | None  # the adapter that trains (None: every weight)

    @classmethod
    def ranks(cls, scenario, spec) -> costs.Ranks:
        raise NotImplementedError

    @classmethod
    def server_device(cls, scenario):
        """`centralised.device` where the scenario names one, else one of the server's accelerators."""
        stated = scenario.centralised.device
        return super().server_device(scenario) if stated is None else resolve_device(stated)

    @classmethod
    def server_accelerators(cls, scenario) -> int:
        return scenario.server.accelerators if scenario.centralised.device is None else 1

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> int:
        need = costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                           scenario.data.max_length, cls.ranks(scenario, spec), embeddings=True,
                                           head=True, full_finetune=cls.full_finetune,
                                           element_bytes=ELEMENT_BYTES[server_precision(scenario)])
        if scenario.centralised.device is None:
            return server_placement(need, scenario, server_device, f" for {cls.name}")
        if need > server_device.memory_gb * 1e9:
            raise ScenarioError(f"centralised.device: {server_device.name} needs {need / 1e9:.2f} GB for {cls.name} "
                                f"but has {server_device.memory_gb:g} GB")
        return 1

    def setup(self) -> None:
        ctx, spec = self.ctx, self.ctx.spec
        ranks = self.ranks(ctx.scenario, spec)
        forward, backward = costs.segment_work(spec, 0, spec.n_layers, ctx.batch, ctx.seq, ranks, True, False,
                                               self.full_finetune)
        self.step_work = forward + backward + costs.optimizer_work(spec, ranks, ctx.scenario.training.weight_decay,
                                                                   self.full_finetune)
        self.configure(ranks)

    def configure(self, ranks: costs.Ranks) -> None:
        raise NotImplementedError

    def round(self, round_index: int):
        ctx = self.ctx
        if round_index == 1:  # the pooled data arrives once, every client over its own link at the same time
            env = ctx.fleet.sim.env
            uploads = [env.process(node.upload(round_index, "data_upload",
                                               costs.dataset_bytes(ctx.partition_sizes[node.index], ctx.seq)))
                       for node in ctx.fleet.clients]
            yield env.all_of(uploads)
        steps = ctx.scenario.training.local_steps * len(ctx.clients)
        work = ctx.backend.step_work(round_index, None, self.adapter, steps)
        yield from ctx.fleet.server_steps(round_index, self.step_work, steps, work)

    def eval_adapters(self) -> list[str]:
        return [self.adapter] if self.adapter else []

    def client_rows(self, round_index: int) -> list[dict]:
        """Clients only own data here: it is pooled at the server, and they train nothing."""
        ctx = self.ctx
        return [{"round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                 "split_layer": 0, "rank": 0, "adapted_weights": 0, "adapter_params": 0, "memory_bytes": 0,
                 "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": ctx.partition_sizes[c.index],
                 "status": "data-only"} for c in ctx.clients]
