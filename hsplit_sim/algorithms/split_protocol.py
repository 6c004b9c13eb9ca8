"""The split fine-tuning protocol shared by SplitLoRA and HSplitLoRA: one round as SimPy processes.

Per client and local iteration: client forward, upload of activations, labels and mask, a queue for one
of the server's accelerators, the server step, download of the activation gradient, client backward
(ARCHITECTURE.md, time model). Durations come from the cost model for each client's own plan; bytes are
the real frames, checked against the cost model.
"""

from dataclasses import dataclass
from functools import cached_property

from hsplit_sim import costs
from hsplit_sim.algorithms.base import Algorithm, batch_indices, checked_bytes, ranks_to_wire


@dataclass(frozen=True)
class ClientPlan:
    """Where a client is cut and which weights carry adapters of which rank, on each side."""

    split: int
    client_ranks: costs.Ranks
    server_ranks: costs.Ranks
    active: bool = True


class PlanCosts:
    """FLOPs and bytes of one iteration under a plan (probe: weight gradients of the frozen projections)."""

    def __init__(self, spec: costs.ModelSpec, plan: ClientPlan, batch: int, seq: int):
        s, n = plan.split, spec.n_layers
        self.client_fwd = costs.forward_flops(spec, 0, s, batch, seq, plan.client_ranks, head=False)
        self.server_fwd = costs.forward_flops(spec, s, n, batch, seq, plan.server_ranks, head=True)
        self.client_bwd = {probe: costs.backward_flops(spec, 0, s, batch, seq, plan.client_ranks, head=False,
                                                       input_requires_grad=False, weight_grads=probe)
                           for probe in (False, True)}
        self.server_bwd = {probe: costs.backward_flops(spec, s, n, batch, seq, plan.server_ranks, head=True,
                                                       input_requires_grad=True, weight_grads=probe)
                           for probe in (False, True)}
        self.up = costs.smashed_bytes(spec, batch, seq)
        self.down = costs.gradient_bytes(spec, batch, seq)
        self.adapter = costs.adapter_bytes(spec, plan.client_ranks)


class SplitProtocol(Algorithm):
    """Subclasses set self.plans (one ClientPlan per client) and name the adapters each step uses."""

    plans: list[ClientPlan]

    def client_adapter(self, client: int) -> str:
        return f"c{client}"

    def server_adapter(self, client: int) -> str:
        raise NotImplementedError

    def probes(self, round_index: int, step: int) -> bool:
        """Whether this iteration also measures weight importance (HSplitLoRA's IWI)."""
        return False

    def record_importance(self, client: int, scores: dict[str, float]) -> None:
        """Receives a probe's gradient-weight products (HSplitLoRA's IWI)."""

    @cached_property
    def adapter_args(self) -> dict:
        training = self.ctx.scenario.training
        return {"alpha": self.ctx.scenario.algorithm.alpha, "lr": training.lr, "weight_decay": training.weight_decay}

    def plan_costs(self, client: int) -> PlanCosts:
        return PlanCosts(self.ctx.spec, self.plans[client], self.ctx.batch, self.ctx.seq)

    def configure_client(self, client: int) -> None:
        plan = self.plans[client]
        self.ctx.worker_of(client).call("configure", client=client, args=dict(
            self.adapter_args, adapter=self.client_adapter(client), ranks=ranks_to_wire(plan.client_ranks),
            split=plan.split))

    def active_clients(self):
        return [c for c in self.ctx.clients if self.plans[c.index].active]

    def train_clients(self, round_index: int):
        """All active clients' local iterations of one round, as one SimPy event."""
        return self.ctx.sim.all_of(self.client_iterations(round_index, c) for c in self.active_clients())

    def client_iterations(self, round_index: int, client):
        ctx, k, sim = self.ctx, client.index, self.ctx.sim
        worker, link, device, plan = ctx.worker_of(k), client.link, client.device, self.plans[k]
        plan_costs = self.plan_costs(k)
        steps = ctx.scenario.training.local_steps
        measure = ctx.scenario.algorithm.importance
        for step in range(steps):
            probe = self.probes(round_index, step)
            batch = batch_indices(ctx.partitions[k], ctx.batch, (round_index - 1) * steps + step, ctx.scenario.seed)
            smashed = worker.call("forward", client=k, args={"adapter": self.client_adapter(k), "probe": probe},
                                  tensors={"batch": batch})
            yield from sim.hold(round_index, k, "client_fwd", f"client{k}",
                                self.compute_seconds(plan_costs.client_fwd, device), flops=plan_costs.client_fwd)
            up = checked_bytes(smashed, plan_costs.up, "upload of activations")
            yield from sim.hold(round_index, k, "upload", f"client{k}.up",
                                costs.transfer_seconds(up, link.up_mbps, link.latency_ms), nbytes=up)
            request = yield from sim.acquire_server(round_index, k)
            reply = ctx.server.call("step", client=k, tensors=smashed.tensors, args={
                "adapter": self.server_adapter(k), "split": plan.split, "probe": probe, "measure": measure})
            server_flops = plan_costs.server_fwd + plan_costs.server_bwd[probe]
            yield from sim.hold(round_index, k, "server_step", "server",
                                self.compute_seconds(server_flops, ctx.server_device), flops=server_flops)
            sim.server.release(request)
            ctx.stats.losses.append(reply.header["result"]["loss"])
            down = checked_bytes(reply, plan_costs.down, "download of gradients")
            yield from sim.hold(round_index, k, "download", f"client{k}.down",
                                costs.transfer_seconds(down, link.down_mbps, link.latency_ms), nbytes=down)
            backward = worker.call("backward", client=k, args={"adapter": self.client_adapter(k), "measure": measure},
                                   tensors={"grad": reply.tensors["grad"]})
            client_flops = plan_costs.client_bwd[probe]
            yield from sim.hold(round_index, k, "client_bwd", f"client{k}",
                                self.compute_seconds(client_flops, device), flops=client_flops)
            ctx.stats.bytes_up += up
            ctx.stats.bytes_down += down
            if probe:
                self.record_importance(k, {**backward.header["result"]["importance"],
                                           **reply.header["result"]["importance"]})

    def upload_adapter(self, round_index: int, client, into: dict):
        """The client's adapter goes up its link to the aggregator."""
        ctx, k = self.ctx, client.index
        reply = ctx.worker_of(k).call("get_adapter", client=k, args={"adapter": self.client_adapter(k)})
        nbytes = checked_bytes(reply, self.plan_costs(k).adapter, "adapter upload")
        into[k] = dict(reply.tensors)
        ctx.stats.bytes_up += nbytes
        yield from ctx.sim.hold(round_index, k, "adapter_upload", f"client{k}.up",
                                costs.transfer_seconds(nbytes, client.link.up_mbps, client.link.latency_ms),
                                nbytes=nbytes)

    def upload_adapters(self, round_index: int, into: dict):
        return self.ctx.sim.all_of(self.upload_adapter(round_index, c, into) for c in self.active_clients())

    def download(self, round_index: int, client, nbytes: int, kind: str = "broadcast"):
        ctx = self.ctx
        ctx.stats.bytes_down += nbytes
        yield from ctx.sim.hold(round_index, client.index, kind, f"client{client.index}.down",
                                costs.transfer_seconds(nbytes, client.link.down_mbps, client.link.latency_ms),
                                nbytes=nbytes)

    def client_rows(self, round_index: int) -> list[dict]:
        ctx = self.ctx
        rows = []
        for c in ctx.clients:
            plan = self.plans[c.index]
            ranks = [r for layer in plan.client_ranks.values() for r in layer.values()]
            rows.append({
                "round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                "split_layer": plan.split, "rank": max(ranks, default=0),
                "adapted_weights": len(ranks), "adapter_params": costs.adapter_params(ctx.spec, plan.client_ranks),
                "memory_bytes": costs.training_memory_bytes(ctx.spec, 0, plan.split, ctx.batch, ctx.seq,
                                                            plan.client_ranks, embeddings=True, head=False),
                "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": len(ctx.partitions[c.index]),
                "status": "active" if plan.active else "dropped"})
        return rows
