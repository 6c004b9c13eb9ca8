"""The split protocol of SplitLoRA and HSplitLoRA.

Per client and local iteration: client forward, upload of activations, labels and mask, a queue for one of
the server's accelerators, the server step, download of the activation gradient, client backward (the fleet
times them, sim/fleet.py). Costs come from the cost model for each client's own plan; in real runs the bytes
are the real frames, checked against it.
"""

from hsplit_sim import costs
from hsplit_sim.algorithms.plans import ClientPlan, ranks_key
from hsplit_sim.algorithms.protocols.collaborative import Collaborative
from hsplit_sim.scenario.catalog import resolve_device
from hsplit_sim.scenario.load import server_precision
from hsplit_sim.sim.fleet import IterationCosts
from hsplit_sim.sim.timemodel import SplitIterationEstimate, split_iteration_estimate

ESTIMATE_COLUMNS = ("estimated_client_s", "estimated_upload_s", "estimated_server_s", "estimated_download_s",
                    "estimated_iteration_s")


class PlanCosts:
    """Work and bytes of one iteration under a plan (with IWI's probe: every projection's output gradient and
    score for the abs_sum measure, the frozen projections' weight gradients for sum_abs; each backward ends
    with the optimiser step over its adapters), the adapter a client uploads (in the client's precision, and as
    the host's fp32 tensors), and the plan's columns of the clients table: memory_bytes is the peak the plan
    needs, its probe step's where it probes (`probed`), else its training step's."""

    def __init__(self, spec: costs.ModelSpec, plan: ClientPlan, batch: int, seq: int, element_bytes: int,
                 weight_decay: float, measure: str = "abs_sum", probed: bool = False):
        s, n = plan.split, spec.n_layers
        client = [costs.segment_work(spec, 0, s, batch, seq, plan.client_ranks, False, False, **costs.probe_flags(m))
                  for m in (None, measure)]
        server = [costs.segment_work(spec, s, n, batch, seq, plan.server_ranks, True, True, **costs.probe_flags(m))
                  for m in (None, measure)]
        client_step = costs.optimizer_work(spec, plan.client_ranks, weight_decay)
        server_step = costs.optimizer_work(spec, plan.server_ranks, weight_decay)
        client_fwd = client[0][0]
        client_bwd = tuple(backward + client_step for _, backward in client)
        server_work = tuple(forward + backward + server_step for forward, backward in server)
        e = element_bytes
        self.iteration = IterationCosts(
            client_fwd, client_bwd, server_work,
            costs.smashed_bytes(spec, batch, seq, e), costs.gradient_bytes(spec, batch, seq, e),
            costs.smashed_bytes(spec, batch, seq), costs.gradient_bytes(spec, batch, seq))
        self.adapter = costs.adapter_bytes(spec, plan.client_ranks, e)
        self.host_adapter = costs.adapter_bytes(spec, plan.client_ranks)
        ranks = [r for layer in plan.client_ranks.values() for r in layer.values()]
        memory = costs.training_memory_bytes(spec, 0, s, batch, seq, plan.client_ranks, embeddings=True, head=False,
                                             element_bytes=e)
        if probed:
            memory = max(memory, costs.training_memory_bytes(spec, 0, s, batch, seq, plan.client_ranks,
                                                             embeddings=True, head=False, element_bytes=e,
                                                             probe=measure))
        self.row = {"split_layer": s, "rank": max(ranks, default=0), "adapted_weights": len(ranks),
                    "adapter_params": costs.adapter_params(spec, plan.client_ranks), "memory_bytes": memory}


def probe_iteration(spec: costs.ModelSpec, split: int, batch: int, seq: int, element_bytes: int,
                    measure: str = "abs_sum") -> IterationCosts:
    """IWI's probe before round 1: one iteration of the base model cut at `split` (no adapter yet, no optimiser
    step) that measures every projection's importance, on both sides of the cut (`probing` is always on)."""
    flags = costs.probe_flags(measure)
    client_fwd, client_bwd = costs.segment_work(spec, 0, split, batch, seq, {}, False, False, **flags)
    server_fwd, server_bwd = costs.segment_work(spec, split, spec.n_layers, batch, seq, {}, True, True, **flags)
    server = server_fwd + server_bwd
    return IterationCosts(client_fwd, (client_bwd, client_bwd), (server, server),
                          costs.smashed_bytes(spec, batch, seq, element_bytes),
                          costs.gradient_bytes(spec, batch, seq, element_bytes),
                          costs.smashed_bytes(spec, batch, seq), costs.gradient_bytes(spec, batch, seq))


def iteration_estimate(scenario, client, n_clients: int, iteration: IterationCosts) -> SplitIterationEstimate:
    """A client's estimated split iteration without a probe (HSplitLoRA's ARMSC chooses splits by it; the plans
    table shows it for every split method). With one shared server-side adapter every client's server step
    waits for the others' (steps in turn); with one per client, the clients share the server's accelerators."""
    turns = (n_clients if scenario.algorithm.server_adapters == "shared"
             else max(1.0, n_clients / scenario.server.accelerators))
    return split_iteration_estimate(iteration.client_fwd + iteration.client_bwd[0], iteration.server[0],
                                    iteration.up, iteration.down, client, resolve_device(scenario.server.device),
                                    server_precision(scenario), turns)


class SplitProtocol(Collaborative):
    """Algorithms set self.plans (one ClientPlan per client) and name the server-side adapter each client uses."""

    family = "split"
    further_tables = ("plans",)
    plans: list[ClientPlan]
    round_state = Collaborative.round_state + ("plans", "_recorded_plans")

    def server_adapter(self, client: int) -> str:
        raise NotImplementedError

    def probes(self, round_index: int, step: int) -> bool:
        """Whether this iteration also measures weight importance (HSplitLoRA's IWI)."""
        return False

    def record_importance(self, client: int, scores: dict[str, float]) -> None:
        """Receives a probe's gradient-weight products (HSplitLoRA's IWI)."""

    @property
    def importance_measure(self) -> str:
        return "abs_sum"

    @property
    def probing(self) -> bool:
        """Whether some steps of every round are also IWI's probe (their memory is then the plan's peak)."""
        return False

    def plan_costs(self, client: int) -> PlanCosts:
        """Costs of the client's current plan, shared by every client with the same plan (looked up again only
        when the client's plan changes: this is on every round's path for every client)."""
        plan = self.plans[client]
        mine = self.__dict__.setdefault("_client_costs", {})
        found = mine.get(client)
        if found is not None and found[0] is plan:
            return found[1]
        e = self.ctx.clients[client].element_bytes
        key = (plan.split, ranks_key(plan.client_ranks), ranks_key(plan.server_ranks), e)
        shared = self.__dict__.setdefault("_plan_costs", {})
        if key not in shared:
            shared[key] = PlanCosts(self.ctx.spec, plan, self.ctx.batch, self.ctx.seq, e,
                                    self.ctx.scenario.training.weight_decay, self.importance_measure, self.probing)
        mine[client] = (plan, shared[key])
        return shared[key]

    def plan_rows(self, round_index: int) -> list[dict]:
        """Rows of the plans table for plans in force from round_index on: only clients whose plan changed; each
        with its estimated iteration under this run's system (iteration_estimate)."""
        ctx = self.ctx
        last = self.__dict__.setdefault("_recorded_plans", {})
        rows = []
        for c in ctx.clients:
            plan = self.plans[c.index]
            if last.get(c.index) == plan:
                continue
            last[c.index] = plan
            e = iteration_estimate(ctx.scenario, c, len(ctx.clients), self.plan_costs(c.index).iteration)
            rows.append({**plan.row(round_index, c.index), **dict(zip(ESTIMATE_COLUMNS, (
                e.client_s, e.upload_s, e.server_s, e.download_s, e.total_s)))})
        self.add_rows("plans", rows)
        return rows

    def adapter_config(self) -> dict:
        return {"scaling": self.config.scaling, "optimizer": self.optimizer()}

    def configure_client(self, client: int) -> None:
        plan = self.plans[client]
        self.ctx.backend.configure(client, self.client_adapter(client), plan.client_ranks, split=plan.split,
                                   **self.adapter_config())

    def active_clients(self):
        return [c for c in self.ctx.clients if self.plans[c.index].active]

    def train(self, round_index: int, client, steps: int, report: int):
        ctx, k = self.ctx, client.index
        plan, iteration = self.plans[k], self.plan_costs(k).iteration
        work = ctx.backend.split_work(round_index, k, self.client_adapter(k), self.server_adapter(k), plan.split,
                                      iteration, self.importance_measure, self.record_importance)
        probes = frozenset(step for step in range(steps) if self.probes(round_index, step))
        return ctx.fleet.split_iterations(round_index, ctx.fleet.clients[k], iteration, steps, probes, work, report)

    def adapter_bytes(self, client: int) -> int:
        return self.plan_costs(client).adapter

    def host_adapter_bytes(self, client: int) -> int:
        return self.plan_costs(client).host_adapter

    def client_rows(self, round_index: int) -> list[dict]:
        ctx = self.ctx
        rows = []
        for c in ctx.clients:
            plan = self.plans[c.index]
            rows.append({
                "round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                **self.plan_costs(c.index).row,
                "memory_budget_bytes": int(c.memory_budget_gb * 1e9), "n_examples": ctx.partition_sizes[c.index],
                "status": "active" if plan.active else "dropped"})
        return rows
