"""SplitLoRA: one split point and one rank for every client; client adapters FedAvg'd (A and B apart).

Clients use one server-side adapter in turn, in the order their server steps happen in simulated time.
"""

import numpy as np

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import data_weights, exact_update, fedavg, adapter_update, relative_error
from hsplit_sim.algorithms.base import Algorithm, batch_indices, checked_bytes, ranks_to_wire


class SplitLoRA(Algorithm):
    name = "splitlora"

    @classmethod
    def memory_needs(cls, scenario, spec) -> tuple[int, int]:
        algo, b, L = scenario.algorithm, scenario.training.batch_size, scenario.data.max_length
        split = algo.split_layer
        client = costs.training_memory_bytes(spec, 0, split, b, L, costs.uniform_ranks(spec, algo.targets, range(split), algo.rank),
                                             embeddings=True, head=False)
        server_ranks = costs.uniform_ranks(spec, algo.targets, range(split, spec.n_layers), algo.rank)
        server = costs.training_memory_bytes(spec, split, spec.n_layers, b, L, server_ranks, embeddings=False, head=True)
        return client, server

    def setup(self) -> None:
        ctx, algo = self.ctx, self.ctx.scenario.algorithm
        spec, self.split = ctx.spec, algo.split_layer
        self.client_ranks = costs.uniform_ranks(spec, algo.targets, range(self.split), algo.rank)
        self.server_ranks = costs.uniform_ranks(spec, algo.targets, range(self.split, spec.n_layers), algo.rank)
        self.scaling = algo.alpha / algo.rank
        self.weights = data_weights([len(p) for p in ctx.partitions])
        b, L = ctx.batch, ctx.seq
        self.fwd_flops = costs.forward_flops(spec, 0, self.split, b, L, self.client_ranks, head=False)
        self.bwd_flops = costs.backward_flops(spec, 0, self.split, b, L, self.client_ranks, head=False,
                                              input_requires_grad=False)
        self.server_flops = (costs.forward_flops(spec, self.split, spec.n_layers, b, L, self.server_ranks, head=True)
                             + costs.backward_flops(spec, self.split, spec.n_layers, b, L, self.server_ranks,
                                                    head=True, input_requires_grad=True))
        adapter_args = {"alpha": algo.alpha, "lr": ctx.scenario.training.lr,
                        "weight_decay": ctx.scenario.training.weight_decay, "split": self.split}
        ctx.server.call("setup_server", args=dict(adapter_args, server_ranks=ranks_to_wire(self.server_ranks),
                                                  client_ranks=ranks_to_wire(self.client_ranks)))
        for client in ctx.clients:
            ctx.worker_of(client.index).call("setup_client", client=client.index,
                                             args=dict(adapter_args, ranks=ranks_to_wire(self.client_ranks)))

    def round(self, round_index: int):
        ctx = self.ctx
        yield ctx.sim.all_of(self.client_iterations(round_index, c) for c in ctx.clients)
        adapters = {}
        yield ctx.sim.all_of(self.upload_adapter(round_index, c, adapters) for c in ctx.clients)
        ordered = [adapters[c.index] for c in ctx.clients]
        merged = fedavg(ordered, self.weights)
        exact = exact_update(ordered, self.weights, [self.scaling] * len(ordered))
        ctx.stats.agg_error = relative_error(adapter_update(merged, self.scaling), exact)
        flops = 2 * len(ordered) * costs.adapter_params(ctx.spec, self.client_ranks)
        yield from ctx.sim.hold(round_index, -1, "aggregate", "server",
                                self.compute_seconds(flops, ctx.server_device), flops=flops)
        yield ctx.sim.all_of(self.broadcast(round_index, c, merged) for c in ctx.clients)
        ctx.server.call("set_adapter", args={"adapter": "global_client"}, tensors=merged)

    def client_iterations(self, round_index: int, client):
        ctx, k, sim = self.ctx, client.index, self.ctx.sim
        worker, link, device = ctx.worker_of(k), client.link, client.device
        steps = ctx.scenario.training.local_steps
        for step in range(steps):
            batch = batch_indices(ctx.partitions[k], ctx.batch, (round_index - 1) * steps + step, ctx.scenario.seed)
            smashed = worker.call("forward", client=k, tensors={"batch": batch})
            yield from sim.hold(round_index, k, "client_fwd", f"client{k}",
                                self.compute_seconds(self.fwd_flops, device), flops=self.fwd_flops)
            up = checked_bytes(smashed, costs.smashed_bytes(ctx.spec, ctx.batch, ctx.seq), "upload of activations")
            yield from sim.hold(round_index, k, "upload", f"client{k}.up",
                                costs.transfer_seconds(up, link.up_mbps, link.latency_ms), nbytes=up)
            request = yield from sim.acquire_server(round_index, k)
            reply = ctx.server.call("step", client=k, tensors=smashed.tensors)
            yield from sim.hold(round_index, k, "server_step", "server",
                                self.compute_seconds(self.server_flops, ctx.server_device), flops=self.server_flops)
            ctx.sim.server.release(request)
            ctx.stats.losses.append(reply.header["result"]["loss"])
            down = checked_bytes(reply, costs.gradient_bytes(ctx.spec, ctx.batch, ctx.seq), "download of gradients")
            yield from sim.hold(round_index, k, "download", f"client{k}.down",
                                costs.transfer_seconds(down, link.down_mbps, link.latency_ms), nbytes=down)
            worker.call("backward", client=k, tensors={"grad": reply.tensors["grad"]})
            yield from sim.hold(round_index, k, "client_bwd", f"client{k}",
                                self.compute_seconds(self.bwd_flops, device), flops=self.bwd_flops)
            ctx.stats.bytes_up += up
            ctx.stats.bytes_down += down

    def upload_adapter(self, round_index: int, client, into: dict):
        ctx, k = self.ctx, client.index
        reply = ctx.worker_of(k).call("get_adapter", client=k)
        nbytes = checked_bytes(reply, costs.adapter_bytes(ctx.spec, self.client_ranks), "adapter upload")
        into[k] = {name: np.array(t) for name, t in reply.tensors.items()}
        ctx.stats.bytes_up += nbytes
        yield from ctx.sim.hold(round_index, k, "adapter_upload", f"client{k}.up",
                                costs.transfer_seconds(nbytes, client.link.up_mbps, client.link.latency_ms),
                                nbytes=nbytes)

    def broadcast(self, round_index: int, client, merged: dict):
        ctx, k = self.ctx, client.index
        nbytes = sum(t.nbytes for t in merged.values())
        ctx.stats.bytes_down += nbytes
        yield from ctx.sim.hold(round_index, k, "broadcast", f"client{k}.down",
                                costs.transfer_seconds(nbytes, client.link.down_mbps, client.link.latency_ms),
                                nbytes=nbytes)
        ctx.worker_of(k).call("set_adapter", client=k, tensors=merged)

    def evaluate(self) -> float:
        reply = self.ctx.server.call("evaluate", args={"adapters": ["global_client", "server"],
                                                       "batch_size": self.ctx.batch})
        return reply.header["result"]["loss"]

    def client_rows(self, round_index: int) -> list[dict]:
        ctx = self.ctx
        memory = self.memory_needs(ctx.scenario, ctx.spec)[0]
        return [{"round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                 "split_layer": self.split, "rank": ctx.scenario.algorithm.rank, "memory_bytes": memory,
                 "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": len(ctx.partitions[c.index]),
                 "status": "active"} for c in ctx.clients]
