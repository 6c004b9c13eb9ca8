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
        ranks = [r for layer in plan.client_ranks.values() for r in layer.values()]
        self.row = {"split_layer": s, "rank": max(ranks, default=0), "adapted_weights": len(ranks),
                    "adapter_params": costs.adapter_params(spec, plan.client_ranks),
                    "memory_bytes": costs.training_memory_bytes(spec, 0, s, batch, seq, plan.client_ranks,
                                                                embeddings=True, head=False)}


class ClientTiming:
    """One client's iteration under one plan, precomputed once: durations, FLOPs, bytes, resource names.

    Probe-dependent entries are tuples indexed by the probe flag (False: 0, True: 1).
    """

    __slots__ = ("plan", "row", "device", "up", "down", "fwd_s", "fwd_up_s", "fwd_flops", "up_bytes", "server_s",
                 "server_flops", "down_s", "down_bwd_s", "bwd_flops", "down_bytes")

    def __init__(self, algorithm: "SplitProtocol", client, plan: ClientPlan, plan_costs: PlanCosts):
        k, link, device = client.index, client.link, client.device
        server_device = algorithm.ctx.server_device
        self.plan, self.row = plan, plan_costs.row
        self.device, self.up, self.down = f"client{k}", f"client{k}.up", f"client{k}.down"
        self.fwd_flops, self.up_bytes, self.down_bytes = plan_costs.client_fwd, plan_costs.up, plan_costs.down
        self.fwd_s = algorithm.compute_seconds(plan_costs.client_fwd, device)
        self.fwd_up_s = self.fwd_s + costs.transfer_seconds(plan_costs.up, link.up_mbps, link.latency_ms)
        self.server_flops = tuple(plan_costs.server_fwd + plan_costs.server_bwd[p] for p in (False, True))
        self.server_s = tuple(algorithm.compute_seconds(f, server_device) for f in self.server_flops)
        self.down_s = costs.transfer_seconds(plan_costs.down, link.down_mbps, link.latency_ms)
        self.bwd_flops = tuple(plan_costs.client_bwd[p] for p in (False, True))
        self.down_bwd_s = tuple(self.down_s + algorithm.compute_seconds(f, device) for f in self.bwd_flops)


def ranks_key(ranks: costs.Ranks) -> tuple:
    return tuple((layer, tuple(sorted(modules.items()))) for layer, modules in sorted(ranks.items()))


class SplitProtocol(Algorithm):
    """Subclasses set self.plans (one ClientPlan per client) and name the adapters each step uses."""

    plans: list[ClientPlan]

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
        """Costs of the client's current plan, shared by every client with the same plan."""
        plan = self.plans[client]
        key = (plan.split, ranks_key(plan.client_ranks), ranks_key(plan.server_ranks))
        cache = self.__dict__.setdefault("_plan_costs", {})
        if key not in cache:
            cache[key] = PlanCosts(self.ctx.spec, plan, self.ctx.batch, self.ctx.seq)
        return cache[key]

    def timing(self, client) -> ClientTiming:
        """The client's ClientTiming for its current plan (recomputed only when the plan changes)."""
        cache = self.__dict__.setdefault("_timing", {})
        plan = self.plans[client.index]
        timing = cache.get(client.index)
        if timing is None or timing.plan is not plan:
            timing = cache[client.index] = ClientTiming(self, client, plan, self.plan_costs(client.index))
        return timing

    def plan_rows(self, round_index: int) -> list[dict]:
        """Rows of the plans table for plans in force from round_index on: only clients whose plan changed."""
        import json

        last = self.__dict__.setdefault("_recorded_plans", {})
        rows = []
        for c in self.ctx.clients:
            plan = self.plans[c.index]
            if last.get(c.index) == plan:
                continue
            last[c.index] = plan
            rows.append({"round": round_index, "client": c.index, "split": plan.split, "active": plan.active,
                         "client_ranks": json.dumps(ranks_to_wire(plan.client_ranks)),
                         "server_ranks": json.dumps(ranks_to_wire(plan.server_ranks))})
        self.__dict__.setdefault("_plan_rows", []).extend(rows)
        return rows

    def tables(self) -> dict[str, list[dict]]:
        return {"plans": self.__dict__.get("_plan_rows", [])}

    def configure_client(self, client: int) -> None:
        if not self.ctx.real:
            return
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
        """The hot path (timing-only runs make millions of these events), with one SimPy event per iteration:
        the server is booked on arrival (ServerQueue: first come, first served), so one timeout covers the
        server queue and step, the download, the client backward and the next iteration's forward and
        upload. A client's device and links are its own, so joining its activities changes no timing. Real
        calls that touch shared state (the server step) run in the order of the server steps; calls on a
        client's own state (its forward and backward) run when the client's process does, which may be before
        their simulated start, as nothing else can observe them."""
        ctx, k, sim = self.ctx, client.index, self.ctx.sim
        t = self.timing(client)
        env, append, book = sim.env, sim.events.append, sim.server.book
        timeout = env.timeout
        steps = ctx.scenario.training.local_steps
        real = ctx.real
        r, device, up_res, down_res = round_index, t.device, t.up, t.down
        fwd_s, fwd_up_s, fwd_flops, up_bytes, down_bytes = t.fwd_s, t.fwd_up_s, t.fwd_flops, t.up_bytes, t.down_bytes
        server_s, server_flops, down_s, down_bwd_s, bwd_flops = (t.server_s, t.server_flops, t.down_s,
                                                                 t.down_bwd_s, t.bwd_flops)
        if real:
            worker, plan, measure = ctx.worker_of(k), self.plans[k], ctx.scenario.algorithm.importance

            def forward(step: int, probe: bool):
                batch = batch_indices(ctx.partitions[k], ctx.batch, (r - 1) * steps + step, ctx.scenario.seed)
                smashed = worker.call("forward", client=k, args={"adapter": self.client_adapter(k), "probe": probe},
                                      tensors={"batch": batch})
                checked_bytes(smashed, up_bytes, "upload of activations")
                return smashed

        probe = self.probes(r, 0)
        if real:
            smashed = forward(0, probe)
        start = env.now
        yield timeout(fwd_up_s)
        last = steps - 1
        for step in range(steps):
            now = env.now
            middle = start + fwd_s
            append((r, k, "client_fwd", device, start, middle, 0, fwd_flops))
            append((r, k, "upload", up_res, middle, now, up_bytes, 0.0))
            seconds = server_s[probe]
            acquired = book(now, seconds)
            append((r, k, "server_queue", "server", now, acquired, 0, 0.0))
            if real:
                reply = ctx.server.call("step", client=k, tensors=smashed.tensors, args={
                    "adapter": self.server_adapter(k), "split": plan.split, "probe": probe, "measure": measure})
                ctx.stats.losses.append(reply.header["result"]["loss"])
                checked_bytes(reply, down_bytes, "download of gradients")
            served = acquired + seconds
            append((r, k, "server_step", "server", acquired, served, 0, server_flops[probe]))
            if real:
                backward = worker.call("backward", client=k, args={"adapter": self.client_adapter(k),
                                                                   "measure": measure},
                                       tensors={"grad": reply.tensors["grad"]})
                if probe:
                    self.record_importance(k, {**backward.header["result"]["importance"],
                                               **reply.header["result"]["importance"]})
            downloaded = served + down_s
            append((r, k, "download", down_res, served, downloaded, down_bytes, 0.0))
            if step == last:
                yield timeout((acquired - now) + seconds + down_bwd_s[probe])
                append((r, k, "client_bwd", device, downloaded, env.now, 0, bwd_flops[probe]))
                break
            start = served + down_bwd_s[probe]
            append((r, k, "client_bwd", device, downloaded, start, 0, bwd_flops[probe]))
            probe = self.probes(r, step + 1)
            if real:
                smashed = forward(step + 1, probe)
            yield timeout((start - now) + fwd_up_s)
        ctx.stats.bytes_up += steps * up_bytes
        ctx.stats.bytes_down += steps * down_bytes

    def adapter_bytes(self, client: int) -> int:
        return self.plan_costs(client).adapter

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
            rows.append({
                "round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                **self.timing(c).row,
                "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": ctx.partition_sizes[c.index],
                "status": "active" if plan.active else "dropped"})
        return rows
