"""Centralised baselines on data pooled at the server: CenLoRA (one-rank LoRA) and FT (every weight).

Simulated time is the server's compute only. Each round takes as many steps as all clients together
take in a split round, so rounds see the same number of examples.
"""

import numpy as np

from hsplit_sim import costs
from hsplit_sim.algorithms.base import Algorithm, batch_indices, ranks_to_wire
from hsplit_sim.errors import ScenarioError

GB = 1e9


class CenLoRA(Algorithm):
    name = "cenlora"
    full_finetune = False

    @classmethod
    def ranks(cls, scenario, spec) -> costs.Ranks:
        if cls.full_finetune:
            return {}
        return costs.uniform_ranks(spec, scenario.algorithm.targets, range(spec.n_layers), scenario.algorithm.rank)

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> None:
        need = costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                           scenario.data.max_length, cls.ranks(scenario, spec), embeddings=True,
                                           head=True, full_finetune=cls.full_finetune)
        if need > server_device.memory_gb * GB:
            raise ScenarioError(f"server.device: {server_device.name} needs {need / GB:.2f} GB for {cls.name} but "
                                f"has {server_device.memory_gb:g} GB")

    def setup(self) -> None:
        ctx, algo, training = self.ctx, self.ctx.scenario.algorithm, self.ctx.scenario.training
        spec = ctx.spec
        ranks = self.ranks(ctx.scenario, spec)
        self.step_flops = (costs.forward_flops(spec, 0, spec.n_layers, ctx.batch, ctx.seq, ranks, head=True)
                           + costs.backward_flops(spec, 0, spec.n_layers, ctx.batch, ctx.seq, ranks, head=True,
                                                  input_requires_grad=False, full_finetune=self.full_finetune))
        self.adapter = None if self.full_finetune else "central"
        if not ctx.real:
            return
        self.pooled = np.sort(np.concatenate(ctx.partitions))
        if self.full_finetune:
            ctx.server.call("setup_full", args={"lr": training.lr, "weight_decay": training.weight_decay})
        else:
            ctx.server.call("configure", args={"adapter": "central", "ranks": ranks_to_wire(ranks),
                                               "alpha": algo.alpha, "lr": training.lr,
                                               "weight_decay": training.weight_decay})

    def round(self, round_index: int):
        ctx = self.ctx
        steps = ctx.scenario.training.local_steps * len(ctx.clients)
        seconds = self.compute_seconds(self.step_flops, ctx.server_device)
        for step in range(steps):
            if ctx.real:
                batch = batch_indices(self.pooled, ctx.batch, (round_index - 1) * steps + step, ctx.scenario.seed)
                reply = ctx.server.call("full_step", args={"adapter": self.adapter}, tensors={"batch": batch})
                ctx.stats.losses.append(reply.header["result"]["loss"])
            yield from ctx.sim.hold(round_index, -1, "central_step", "server", seconds, flops=self.step_flops)

    def eval_adapters(self) -> list[str]:
        return [self.adapter] if self.adapter else []

    def client_rows(self, round_index: int) -> list[dict]:
        """Clients only own data here: they send it to the server once and train nothing."""
        ctx = self.ctx
        return [{"round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                 "split_layer": 0, "rank": 0, "adapted_weights": 0, "adapter_params": 0, "memory_bytes": 0,
                 "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": ctx.partition_sizes[c.index],
                 "status": "data-only"} for c in ctx.clients]


class FT(CenLoRA):
    """Full fine-tuning of every weight on pooled data at the server."""

    name = "ft"
    full_finetune = True
