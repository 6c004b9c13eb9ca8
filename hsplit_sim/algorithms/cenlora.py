"""CenLoRA: LoRA with one rank on data pooled at the server; simulated time is the server's compute only.

Each round takes as many steps as all clients together take in a split round, so rounds see the same
number of examples.
"""

import numpy as np

from hsplit_sim import costs
from hsplit_sim.algorithms.base import Algorithm, batch_indices, ranks_to_wire


class CenLoRA(Algorithm):
    name = "cenlora"

    @classmethod
    def memory_needs(cls, scenario, spec) -> tuple[int, int]:
        algo = scenario.algorithm
        ranks = costs.uniform_ranks(spec, algo.targets, range(spec.n_layers), algo.rank)
        return 0, costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                              scenario.data.max_length, ranks, embeddings=True, head=True)

    def setup(self) -> None:
        ctx, algo = self.ctx, self.ctx.scenario.algorithm
        spec = ctx.spec
        self.ranks = costs.uniform_ranks(spec, algo.targets, range(spec.n_layers), algo.rank)
        self.pooled = np.sort(np.concatenate(ctx.partitions))
        self.step_flops = (costs.forward_flops(spec, 0, spec.n_layers, ctx.batch, ctx.seq, self.ranks, head=True)
                           + costs.backward_flops(spec, 0, spec.n_layers, ctx.batch, ctx.seq, self.ranks, head=True,
                                                  input_requires_grad=False))
        ctx.server.call("setup_central", args={"ranks": ranks_to_wire(self.ranks), "alpha": algo.alpha,
                                               "lr": ctx.scenario.training.lr,
                                               "weight_decay": ctx.scenario.training.weight_decay})

    def round(self, round_index: int):
        ctx = self.ctx
        steps = ctx.scenario.training.local_steps * len(ctx.clients)
        for step in range(steps):
            batch = batch_indices(self.pooled, ctx.batch, (round_index - 1) * steps + step, ctx.scenario.seed)
            reply = ctx.server.call("central_step", tensors={"batch": batch})
            ctx.stats.losses.append(reply.header["result"]["loss"])
            yield from ctx.sim.hold(round_index, -1, "central_step", "server",
                                    self.compute_seconds(self.step_flops, ctx.server_device), flops=self.step_flops)

    def evaluate(self) -> float:
        reply = self.ctx.server.call("evaluate", args={"adapters": ["central"], "batch_size": self.ctx.batch})
        return reply.header["result"]["loss"]

    def client_rows(self, round_index: int) -> list[dict]:
        """Clients only own data here: they send it to the server once and train nothing."""
        ctx = self.ctx
        return [{"round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                 "split_layer": 0, "rank": 0, "memory_bytes": 0,
                 "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": len(ctx.partitions[c.index]),
                 "status": "data-only"} for c in ctx.clients]
