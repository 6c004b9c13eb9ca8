"""HSplitLoRA = IWI + ARMSC + NAA (Lin et al., arXiv 2505.02795; formulas and choices in docs/algorithms.md).

Before round 1 (as round 0), every client runs one probe iteration of the base model, whose importance
(I_bar_0) the plans of round 1 are solved from (prepare). Each round: every client trains its own client-side
adapters and, on the server, one server-side adapter that all clients train in turn (algorithm.server_adapters:
shared, the default, as SplitLoRA's code does) or its own server-side adapters (per_client), under a
per-client plan (split point, rank per weight) that fits its memory budget. The first local step of a round
also measures weight importance (IWI's gradient probe, charged in simulated time). At the round's end all
adapters are stacked with each client's weight and scaling folded in (NAA; a shared server-side adapter
counts block by block for the clients whose server side holds the block), the exact sum of updates is merged
into the base weights on every worker, and fresh adapters start the next round under plans re-solved from
the smoothed importance (ARMSC).

Timing-only runs (no workers) measure nothing: importance stays uniform, the plans of round 0 stand, and
the probes are still charged. A replay (re-timing a trained run) takes each round's plans from the trained
run's plans table instead, so it charges exactly what the trained run did.

Ablations: iwi off (uniform importance, no probe), armsc off (one split and rank for all, set by the
weakest client), naa off (one global adapter kept across rounds at the top rank of Q: every client starts a
round from its truncation to the client's plan, and the reported adapters, zero-padded to it, are averaged A and B
apart into it; nothing is merged into the base weights and nothing is re-initialised).
"""

import re
from typing import Literal

import numpy as np
from pydantic import Field

from hsplit_sim import costs
from hsplit_sim.algorithms import importance as iwi
from hsplit_sim.algorithms.aggregation import (
    LORA_A,
    LORA_B,
    adapter_update,
    exact_update,
    factors_update,
    lora_pairs,
    stack,
    zero_pad_average,
)
from hsplit_sim.algorithms.base import Outcome, Planned, server_placement
from hsplit_sim.algorithms.plans import ClientPlan, ranks_key
from hsplit_sim.algorithms.protocols.split import PlanCosts, SplitProtocol, iteration_estimate, probe_iteration
from hsplit_sim.algorithms.registry import register
from hsplit_sim.algorithms.splitlora import fitting_configuration
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.load import server_precision
from hsplit_sim.scenario.schema import ELEMENT_BYTES, AlgorithmConfig
from hsplit_sim.sim.timemodel import client_seconds

GB = 1e9
LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def module_layer(path: str) -> int:
    return int(LAYER.search(path).group(1))


def server_pieces(server: dict[str, np.ndarray], splits: list[int],
                  weights: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The shared server-side adapter cut by block for NAA: block b's piece stands for every client whose
    server side holds b (split <= b), so it carries the sum of their data weights."""
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for key, value in server.items():
        by_layer.setdefault(module_layer(key), {})[key] = value
    layers = sorted(by_layer)
    return ([by_layer[b] for b in layers],
            np.array([sum(w for w, split in zip(weights, splits) if split <= b) for b in layers]))


def merged_ranks(rank_maps) -> costs.Ranks:
    merged: costs.Ranks = {}
    for ranks in rank_maps:
        for layer, modules in ranks.items():
            merged.setdefault(layer, {}).update(modules)
    return merged


@register
class HSplitLoRA(SplitProtocol):
    name = "hsplitlora"
    further_tables = ("plans", "importance")
    round_state = SplitProtocol.round_state + ("importance", "held", "shares", "global_adapter",
                                               "layouts")

    class Config(AlgorithmConfig):
        name: Literal["hsplitlora"]
        server_adapters: Literal["shared", "per_client"] = Field(
            "shared", description="one server-side adapter the clients train in turn (as SplitLoRA's default), "
            "or one per client; either way aggregated by NAA block by block with the weight of the clients it "
            "stands for")
        importance: Literal["abs_sum", "sum_abs"] = Field(
            "abs_sum", description="IWI's gradient-weight product: |sum w*g| or sum |w*g|")
        resplit_threshold: float = Field(0.1, ge=0, description="re-split when the client side's share of "
                                         "importance moves by more than this")
        adapter_budget: float = Field(
            1.0, gt=0, description="trainable adapter parameters of a client's plan per block, on either side of "
            "the cut, as a multiple of what SplitLoRA's configuration (targets at rank) gives a block")
        time_budget_s: float | None = Field(
            None, gt=0, description="longest client compute per local iteration (forward, backward and "
            "optimiser step of its segment on its device), seconds; none: memory alone bounds a client's plan")
        iwi: bool = Field(True, description="ablation switch: important weight identification")
        armsc: bool = Field(True, description="ablation switch: adaptive rank and split configuration")
        naa: bool = Field(True, description="ablation switch: noise-free adapter aggregation (off: one global "
                          "adapter kept across rounds, zero-padded and averaged A and B apart, truncated to each "
                          "client's plan)")


    @classmethod
    def weight_costs(cls, scenario, spec) -> dict[str, float]:
        keys = iwi.candidate_weights(spec, 0, spec.n_layers)
        return {k: iwi.weight_cost(spec, k, scenario.algorithm.rank, scenario.training.batch_size,
                                   scenario.data.max_length) for k in keys}

    @classmethod
    def solve(cls, scenario, spec, client, n_clients: int, importance: dict[str, float],
              splits: list[int]) -> ClientPlan | None:
        """A client's plan by ARMSC: the split of least estimated iteration time among those within its budgets,
        with IWI's selection of weights and ranks on both sides of it. With IWI on, every round's first step is
        also its probe, so the plan must fit the memory of that step too (and then so does round 0's probe at its
        split: the same step without adapters holds less)."""
        algo = scenario.algorithm
        batch, seq = scenario.training.batch_size, scenario.data.max_length
        within_time = None
        if algo.time_budget_s is not None:
            def within_time(split: int, ranks: costs.Ranks) -> bool:
                """Its longest iteration: with IWI on, every round's first, which is also the probe."""
                work = iwi.client_work(spec, split, batch, seq, ranks, scenario.training.weight_decay,
                                       algo.importance if algo.iwi else None)
                return client_seconds(work, client) <= algo.time_budget_s

        def seconds(split: int, client_ranks: costs.Ranks, server_ranks: costs.Ranks) -> float:
            iteration = PlanCosts(spec, ClientPlan(split, client_ranks, server_ranks), batch, seq,
                                  client.element_bytes, scenario.training.weight_decay).iteration
            return iteration_estimate(scenario, client, n_clients, iteration).total_s

        found = iwi.configure_client(spec, importance, cls.block_adapter_budget(scenario, spec),
                                     client.memory_budget_gb * GB, algo.rank_set, batch, seq, splits, seconds,
                                     within_time, client.element_bytes, algo.importance if algo.iwi else None)
        return None if found is None else ClientPlan(*found)

    @classmethod
    def solve_each(cls, scenario, spec, clients, importance: dict[str, float],
                   splits: list[list[int]]) -> list[ClientPlan | None]:
        """solve for every client, each over its own splits. A plan depends on the client only through its
        group's device and link, its memory budget and its number format, so clients alike in those are solved
        once: a fleet of thousands has a few kinds of client, and a solve of SmolLM2-135M over every split takes
        about half a second."""
        solved: dict[tuple, ClientPlan | None] = {}
        plans = []
        for client, its_splits in zip(clients, splits):
            key = (client.group, client.memory_budget_gb, client.precision, tuple(its_splits))
            if key not in solved:
                solved[key] = cls.solve(scenario, spec, client, len(clients), importance, its_splits)
            plans.append(solved[key])
        return plans

    @staticmethod
    def block_adapter_budget(scenario, spec) -> int:
        """Trainable adapter parameters per block, on whichever side holds it: what SplitLoRA's configuration
        (algorithm.targets at algorithm.rank) gives a block, times algorithm.adapter_budget."""
        algo = scenario.algorithm
        block = costs.uniform_ranks(spec, algo.targets, [0], algo.rank)
        return int(algo.adapter_budget * costs.adapter_params(spec, block))

    @classmethod
    def shared_server_side(cls, scenario, plans: list[ClientPlan | None]) -> list[ClientPlan | None]:
        """With one shared server-side adapter: each weight at the largest rank any client's plan gives it on
        the server side; each plan keeps the part its own server side runs (and trains)."""
        if scenario.algorithm.server_adapters != "shared" or not scenario.algorithm.armsc or not all(plans):
            return plans
        shared: costs.Ranks = {}
        for plan in plans:
            for layer, modules in plan.server_ranks.items():
                for module, rank in modules.items():
                    shared.setdefault(layer, {})[module] = max(rank, shared.get(layer, {}).get(module, 0))
        return [ClientPlan(p.split, p.client_ranks, {b: m for b, m in shared.items() if b >= p.split}, p.active)
                for p in plans]

    @classmethod
    def fixed_plan(cls, scenario, spec, clients) -> ClientPlan | None:
        """Without ARMSC: SplitLoRA's configuration for the weakest client (and, with IWI on, its probe step),
        for everyone."""
        algo = scenario.algorithm
        fitting = fitting_configuration(scenario, spec, clients, algo.importance if algo.iwi else None)
        if fitting is None:
            return None
        split, rank = fitting
        targets = algo.targets
        return ClientPlan(split, costs.uniform_ranks(spec, targets, range(split), rank),
                          costs.uniform_ranks(spec, targets, range(split, spec.n_layers), rank))

    @classmethod
    def initial_plans(cls, scenario, spec, clients) -> list[ClientPlan | None]:
        if not scenario.algorithm.armsc:
            return [cls.fixed_plan(scenario, spec, clients)] * len(clients)
        uniform = {k: 1.0 for k in iwi.candidate_weights(spec, 0, spec.n_layers)}
        splits = list(range(1, spec.n_layers))
        return cls.shared_server_side(scenario, cls.solve_each(scenario, spec, clients, uniform,
                                                               [splits] * len(clients)))

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> int:
        for client, plan in zip(clients, cls.initial_plans(scenario, spec, clients)):
            if plan is None:
                raise ScenarioError(
                    f"clients.{client.group}: client {client.index} ({client.device.name}) cannot hold even one "
                    f"block with an adapter within its memory budget of {client.memory_budget_gb:g} GB"
                    + ("" if scenario.algorithm.time_budget_s is None
                       else f" and algorithm.time_budget_s of {scenario.algorithm.time_budget_s:g} s"))
        everything = {layer: {m: max(scenario.algorithm.rank_set) for m in modules}
                      for layer, modules in costs.uniform_ranks(spec, list(costs.TARGET_MODULES[spec.family]),
                                                                range(spec.n_layers), 1).items()}
        probes = [None, scenario.algorithm.importance] if scenario.algorithm.iwi else [None]
        need = max(costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                               scenario.data.max_length, everything, embeddings=True, head=True,
                                               element_bytes=ELEMENT_BYTES[server_precision(scenario)], probe=probe)
                   for probe in probes)  # with IWI on, every round's first step is also the probe
        return server_placement(need, scenario, server_device, " at most")

    def setup(self) -> None:
        ctx = self.ctx
        self.cost = self.weight_costs(ctx.scenario, ctx.spec)
        self.importance: dict[str, float] | None = None
        self.measured: dict[str, dict[int, float]] = {}
        self.plans = self.initial_plans(ctx.scenario, ctx.spec, ctx.clients)
        self.held = [p.split for p in self.plans]  # blocks 0..held-1 of each client have current weights
        self.shares = [iwi.client_side_share({k: 1.0 for k in self.cost}, p.split) for p in self.plans]
        self.plan_rows(0 if self.prepares else 1)  # with a probe first, these plans only cut its iteration
        self.configure_all()
        if not self.config.naa:
            self.start_global()

    def configure_all(self) -> None:
        """Fresh adapters (A random, B zero) for every client, on its worker and on the server."""
        backend = self.ctx.backend
        for client in self.ctx.clients:
            plan = self.plans[client.index]
            self.configure_client(client.index)
            if plan.server_ranks and not self.shared:
                backend.configure(None, self.server_adapter(client.index), plan.server_ranks, split=plan.split,
                                  **self.adapter_config())
        ranks = merged_ranks(p.server_ranks for p in self.plans) if self.shared else {}
        if ranks:
            backend.configure(None, "server", ranks, split=min(p.split for p in self.plans), **self.adapter_config())

    @classmethod
    def device_speeds_matter(cls, config) -> bool:
        """A compute budget bounds each client's plan by its device's speed."""
        return config.time_budget_s is not None

    def __init__(self, ctx):
        super().__init__(ctx)
        self.shared = self.config.server_adapters == "shared"

    @property
    def order_sensitive(self) -> bool:
        """A shared server-side adapter is trained in the order of the server steps: timing can change training."""
        return self.shared

    @property
    def importance_measure(self) -> str:
        return self.config.importance

    @property
    def probing(self) -> bool:
        return self.config.iwi

    def server_adapter(self, client: int) -> str:
        return "server" if self.shared else f"s{client}"

    def probes(self, round_index: int, step: int) -> bool:
        return self.config.iwi and step == 0

    def start_round(self, round_index: int) -> None:
        self.measured = {}

    @property
    def prepares(self) -> bool:
        """IWI's probe before round 1, wherever importance can change the plans (charged in timing-only runs
        too, which measure nothing)."""
        return self.config.iwi and self.config.armsc

    def prepare(self):
        """IWI's probe before round 1, as round 0: every client the fleet lets take part runs one probe
        iteration of the base model at the split its budgets alone give it (initial_plans) and uploads its
        side's scores; I_bar_0 is their average (update_importance), and every client's plan is solved again
        from it over all splits, as in round 1 of the paper."""
        ctx = self.ctx
        self.start_round(0)
        with ctx.fleet.independent_server_steps():  # no adapter yet: the probes share no server-side state
            taking_part = yield ctx.fleet.sim.env.process(ctx.fleet.participate(
                0, self.active_clients(), 1, lambda node, steps, report: self.probe(node.index, steps, report)))
        reported = set(taking_part.reported)  # a client stopped before its scores arrived counts for nothing
        self.measured = {key: kept for key, by_client in self.measured.items()
                         if (kept := {c: v for c, v in by_client.items() if c in reported})}
        self.update_importance(0)
        previous, proposed = self.plans, self.plans
        if self.importance is not None:
            splits = list(range(1, ctx.spec.n_layers))
            solved = self.solve_each(ctx.scenario, ctx.spec, ctx.clients, self.importance,
                                     [splits] * len(ctx.clients))
            proposed = self.shared_server_side(ctx.scenario, [new or plan for new, plan in zip(solved, previous)])
        self.plans = ctx.backend.plans(1, proposed, previous)
        self.shares = [iwi.client_side_share(self.importance or {k: 1.0 for k in self.cost}, p.split)
                       for p in self.plans]
        self.plan_rows(1)
        if self.plans != previous:
            if self.config.naa:
                self.configure_all()
            else:
                self.load_global()

    def probe(self, client: int, steps: int, report: bool):
        """A client's probe before round 1 (none where the fleet has it drop out at once), then the upload of
        its side's scores (one fp32 value per projection) if it reports."""
        ctx = self.ctx
        node, split = ctx.fleet.clients[client], self.plans[client].split
        iteration = probe_iteration(ctx.spec, split, ctx.batch, ctx.seq, ctx.clients[client].element_bytes,
                                    self.importance_measure)
        work = ctx.backend.probe_work(client, split, iteration, self.importance_measure, self.record_importance)
        if steps:
            yield from ctx.fleet.split_iterations(0, node, iteration, 1, frozenset({0}), work, 0)
        if report:
            yield from node.upload(0, "importance_upload", self.score_bytes(split))

    def score_bytes(self, split: int) -> int:
        """The scores of a client side cut at `split`, as they go up: one fp32 value per projection."""
        return 4 * len(iwi.candidate_weights(self.ctx.spec, 0, split))

    def adapter_bytes(self, client: int) -> int:
        """What a client uploads at a round's end: its adapters and, with IWI on, the scores its first step
        measured, which go up with them (round 0's go up on their own: probe)."""
        scores = self.score_bytes(self.plans[client].split) if self.config.iwi else 0
        return super().adapter_bytes(client) + scores

    def record_importance(self, client: int, scores: dict[str, float]) -> None:
        """Kept per client and averaged in client order, so importance (and the plans) cannot depend on the
        order in which probes finish in simulated time, which system changes alone can alter."""
        for key, value in scores.items():
            self.measured.setdefault(key, {})[client] = value / self.cost[key]

    def factor_shapes(self, plans: list[ClientPlan]) -> dict[tuple[int, str], tuple[int, int, int]]:
        """(layer, module) -> (d_out, stacked rank, d_in) of NAA's stacked factors, from the plans alone."""
        stacked: dict[tuple[int, str], int] = {}
        server_side = ([merged_ranks(p.server_ranks for p in plans)] if self.shared
                       else [p.server_ranks for p in plans])
        for ranks in [p.client_ranks for p in plans] + server_side:
            for layer, modules in ranks.items():
                for module, rank in modules.items():
                    if rank > 0:
                        stacked[layer, module] = stacked.get((layer, module), 0) + rank
        shapes = {}
        for (layer, module), rank in sorted(stacked.items()):
            d_in, d_out = costs.module_shape(self.ctx.spec, module)
            shapes[layer, module] = (d_out, rank, d_in)
        return shapes

    def server_side_adapters(self, clients) -> list[str]:
        if self.shared:
            return ["server"] if any(p.server_ranks for p in self.plans) else []
        return [self.server_adapter(c.index) for c in clients if self.plans[c.index].server_ranks]

    def planned(self, clients) -> Planned:
        plans = [self.plans[c.index] for c in clients]
        shapes = self.factor_shapes(plans)
        if not self.config.naa:  # every contributor's A and B weighted and added into the global adapter
            flops = sum(2 * rank * (d_out + d_in) for d_out, rank, d_in in shapes.values())
            top = max(self.config.rank_set)
            return Planned(flops, {"shapes of the aggregated adapters": {
                key: (d_out, top, d_in) for key, (d_out, _, d_in) in shapes.items()}})
        flops = sum(rank * d_in for _, rank, d_in in shapes.values())  # folding p_k s_k into the stacked A
        return Planned(flops, {"shapes of the aggregated adapters": shapes})

    def aggregate(self, contributions) -> Outcome:
        """NAA: every client's adapters on both sides stacked with its weight and scaling (a shared server-side
        adapter counts block by block for the clients whose server side holds the block); without NAA, the
        same adapters zero-padded and averaged A and B apart into the global adapter (average_into_global)."""
        algo, plans = self.config, self.plans
        weights = contributions.weights
        adapters = []
        for k in contributions.clients:
            adapter = dict(contributions.client_side[k])
            if plans[k].server_ranks and not self.shared:
                adapter.update(contributions.server_side[self.server_adapter(k)])
            adapters.append(adapter)
        if "server" in contributions.server_side and self.shared:
            pieces, piece_weights = server_pieces(contributions.server_side["server"],
                                                  [plans[k].split for k in contributions.clients], weights)
            held = piece_weights > 0  # blocks no reporting client leaves to the server stand for nobody
            adapters = adapters + [piece for piece, keep in zip(pieces, held) if keep]
            weights = np.concatenate([weights, piece_weights[held]])
        if not algo.naa:
            return self.average_into_global(adapters, weights)
        factors = stack(adapters, weights, algo.scaling, algo.contributors)
        shapes = {}
        for path, (b, a) in factors.items():
            layer = module_layer(path)
            shapes[layer, path.split(f".{layer}.", 1)[1]] = (b.shape[0], b.shape[1], a.shape[1])
        return Outcome(used=factors_update(factors),
                       exact=exact_update(adapters, weights, algo.scaling, algo.contributors),
                       measured={"shapes of the aggregated adapters": shapes}, merge=factors)

    def after_aggregation(self, round_index: int) -> None:
        """New importance and plans (ARMSC); the backend may impose a trained run's plans (replay)."""
        ctx, previous = self.ctx, self.plans
        self.update_importance(round_index)
        proposed = self.shared_server_side(ctx.scenario, self.next_plans(previous))
        self.plans = ctx.backend.plans(round_index + 1, proposed, previous)
        self.plan_rows(round_index + 1)

    def deliver(self, round_index: int, client, planned: Planned):
        """The merged update of the client's side goes down (stacked factors or dense, whichever is smaller)
        and is added to its weights (without NAA: the global adapter truncated to its next client-side plan,
        which replaces its adapter); then come the weights of blocks it now runs but has no current weights
        of (its split moved deeper since its last delivery)."""
        node = self.ctx.fleet.clients[client.index]
        plan, held = self.plans[client.index], self.held[client.index]
        e = client.element_bytes
        if self.config.naa:
            shapes = planned.predicted["shapes of the aggregated adapters"]
            mine = [shape for (layer, _), shape in shapes.items() if layer < plan.split]
            nbytes = sum(min((d_out + d_in) * rank * e, d_out * d_in * e) for d_out, rank, d_in in mine)
            yield from node.download(round_index, "broadcast", nbytes)
            yield from node.compute(round_index, "merge", costs.merge_work(mine))
        else:  # the global adapter truncated to its next client-side plan replaces its adapter
            yield from node.download(round_index, "broadcast", costs.adapter_bytes(self.ctx.spec, plan.client_ranks, e))
        if plan.split > held:
            moved = costs.weights_bytes(self.ctx.spec, held, plan.split, embeddings=False, head=False,
                                        element_bytes=client.element_bytes)
            yield from node.download(round_index, "resplit", moved)
        self.held[client.index] = plan.split

    def after_round(self, round_index: int) -> None:
        if self.config.naa:
            self.configure_all()
        else:
            self.load_global()

    @property
    def replaces_adapters(self) -> bool:
        """NAA merges each round's update into the weights (a client that sat rounds out merges every update it
        missed); without NAA the global adapter's truncation replaces a client's adapter (the latest suffices)."""
        return not self.config.naa

    # Without NAA: one global adapter, kept across rounds.

    def start_global(self) -> None:
        """The global adapter: every projection of every block at the top rank of Q, created from the seed like
        every adapter (A random, B zero), on the server, where it is the model evaluated; every client starts
        round 1 from its truncation, so all share one initialisation."""
        ctx = self.ctx
        spec = ctx.spec
        ranks = costs.uniform_ranks(spec, list(costs.TARGET_MODULES[spec.family]), range(spec.n_layers),
                                    max(self.config.rank_set))
        ctx.backend.configure(None, "global", ranks, self.config.scaling)
        self.global_adapter = ctx.backend.adapter(None, "global")  # None: nothing trains
        self.layouts = self.adapter_layouts()  # configure_all has just created them
        self.load_global()

    def adapter_layouts(self) -> dict[tuple[int | None, str], tuple[costs.Ranks, int]]:
        """(client, or None on the server; adapter name) -> (ranks, split) of every trained adapter under the
        plans in force (the adapters configure_all creates)."""
        layouts = {}
        for client in self.ctx.clients:
            plan = self.plans[client.index]
            layouts[client.index, self.client_adapter(client.index)] = (plan.client_ranks, plan.split)
            if plan.server_ranks and not self.shared:
                layouts[None, self.server_adapter(client.index)] = (plan.server_ranks, plan.split)
        ranks = merged_ranks(p.server_ranks for p in self.plans) if self.shared else {}
        if ranks:
            layouts[None, "server"] = (ranks, min(p.split for p in self.plans))
        return layouts

    def load_global(self) -> None:
        """Before a round: every trained adapter takes the truncation of the global adapter to its plan's ranks
        (global_for). One whose plan is unchanged keeps its values' AdamW state (set_adapter keeps it, as for
        every adapter a rule hands back); one ARMSC re-planned is reshaped first (Role.reshape: the moments
        carry over where its old and new weights overlap); one the plans now need for the first time is new."""
        backend = self.ctx.backend
        layouts = self.adapter_layouts()
        for (client, name), (ranks, split) in layouts.items():
            before = self.layouts.get((client, name))
            if before is None:
                backend.configure(client, name, ranks, split=split, **self.adapter_config())
            elif (ranks_key(before[0]), before[1]) != (ranks_key(ranks), split):
                backend.reshape(client, name, ranks, split=split)
        self.layouts = {**self.layouts, **layouts}
        if self.global_adapter is None:
            return
        backend.apply(self, Outcome(
            used={}, exact={}, measured={},
            client_adapters={k: self.global_for(ranks) for (k, _), (ranks, _) in layouts.items() if k is not None},
            server_adapters={name: self.global_for(ranks) for (k, name), (ranks, _) in layouts.items() if k is None}))

    def global_for(self, ranks: costs.Ranks) -> dict[str, np.ndarray]:
        """The global adapter truncated to a layout: the first r rows of A and columns of B of every weight the
        layout gives rank r > 0."""
        out = {}
        for path, (a, b) in lora_pairs(self.global_adapter).items():
            layer = module_layer(path)
            rank = ranks.get(layer, {}).get(path.split(f".{layer}.", 1)[1], 0)
            if rank > 0:
                out[path + LORA_A] = np.ascontiguousarray(a[:rank])
                out[path + LORA_B] = np.ascontiguousarray(b[:, :rank])
        return out

    def average_into_global(self, adapters: list[dict[str, np.ndarray]], weights: np.ndarray) -> Outcome:
        """The reported adapters (and server-side pieces) zero-padded to the global adapter's rank and averaged A
        and B apart with p'_k (aggregation.py: zero_pad_average); the result replaces those weights of the
        global adapter, whose other weights keep their values. The error is judged as for every rule that keeps
        adapters: s B A of the new global weights against the exact sum_k p'_k s B_k A_k of the adapters
        averaged."""
        algo = self.config
        ranks = {m: a.shape[0] for m, (a, _) in lora_pairs(self.global_adapter).items()}
        averaged = zero_pad_average(adapters, weights, algo.contributors, ranks)
        self.global_adapter = {**self.global_adapter, **averaged}
        shapes = {}
        for path, (a, b) in lora_pairs(averaged).items():
            layer = module_layer(path)
            shapes[layer, path.split(f".{layer}.", 1)[1]] = (b.shape[0], b.shape[1], a.shape[1])
        return Outcome(used=adapter_update(averaged, algo.scaling),
                       exact=exact_update(adapters, weights, algo.scaling, algo.contributors),
                       measured={"shapes of the aggregated adapters": shapes},
                       server_adapters={"global": self.global_adapter})

    def update_importance(self, round_index: int) -> None:
        if not self.measured:
            return
        current = {key: float(np.mean([by_client[c] for c in sorted(by_client)]))
                   for key, by_client in self.measured.items()}
        self.importance = iwi.smooth(self.importance, current, round_index, self.ctx.scenario.training.rounds)
        rows = []
        for key, value in sorted(self.importance.items()):
            layer, module = iwi.parse_key(key)
            rows.append({"round": round_index, "layer": layer, "module": module,
                         "measured": current.get(key, float("nan")), "smoothed": value})
        self.add_rows("importance", rows)

    def next_plans(self, previous: list[ClientPlan]) -> list[ClientPlan]:
        """Re-solve ranks each round; move a split only when the client side's share of importance moved."""
        ctx, algo = self.ctx, self.config
        if not algo.armsc or self.importance is None:
            return previous
        every_split = list(range(1, ctx.spec.n_layers))
        shares = {split: iwi.client_side_share(self.importance, split) for split in {p.split for p in previous}}
        splits = [every_split if abs(shares[plan.split] - self.shares[client.index]) > algo.resplit_threshold
                  else [plan.split] for client, plan in zip(ctx.clients, previous)]
        plans = []
        for client, solved, plan in zip(ctx.clients, self.solve_each(ctx.scenario, ctx.spec, ctx.clients,
                                                                     self.importance, splits), previous):
            solved = solved or plan
            if solved.split != plan.split:
                self.shares[client.index] = iwi.client_side_share(self.importance, solved.split)
            plans.append(solved)
        return plans

    def eval_adapters(self) -> list[str]:
        """NAA merges into the base weights; without it the server evaluates the global adapter."""
        return [] if self.config.naa else ["global"]
