"""Real training: every operation is a request to the run's workers over ZeroMQ, and every quantity the cost
model predicted (frame bytes, an aggregation's FLOPs and shapes) is checked against the real tensors."""

import logging
import math

import numpy as np

from hsplit_sim.algorithms.aggregation import relative_error
from hsplit_sim.algorithms.base import Contributions, RoundStats
from hsplit_sim.algorithms.plans import ranks_to_wire
from hsplit_sim.backends import Backend
from hsplit_sim.errors import RunError
from hsplit_sim.results import HOST_TIME_COLUMNS
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime.heap import c_heap_trim
from hsplit_sim.runtime.wire import JSON_PREFIX, Message, from_json_arrays, json_arrays, page
from hsplit_sim.sim.fleet import SplitWork, StepWork

log = logging.getLogger("hsplit_sim")


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


def check_equal(real, predicted, what: str) -> None:
    """A quantity of real tensors must equal the cost model's: a mismatch is a bug."""
    if real != predicted:
        raise RunError(f"{what}: the cost model predicted {predicted} but the real tensors gave {real}")


def checked_bytes(message: Message, predicted: int, what: str) -> int:
    """The real frame bytes, which must equal the cost model's prediction."""
    if message.payload_bytes != predicted:
        raise RunError(f"{what}: the cost model predicted {predicted} bytes but the real frames carried "
                       f"{message.payload_bytes}")
    return message.payload_bytes


def seconds(reply: Message) -> float:
    """The host seconds a worker measured for a request."""
    return reply.header.get("seconds", math.nan)


class RealBackend(Backend):
    def __init__(self, scenario, server: WorkerConnection, client_workers: list[WorkerConnection],
                 partitions: list[np.ndarray], stats: RoundStats, overlap_split: bool = False):
        """overlap_split: the server and the client workers have cores of their own, so a split iteration's
        server step may run while the client worker computes (_RealSplitWork); sharing cores, that overlap
        measured slower on SmolLM2-135M."""
        self.scenario, self.server, self.client_workers = scenario, server, client_workers
        self.overlap_split = overlap_split
        self.partitions, self.stats = partitions, stats
        self.host_times: list[tuple] = []  # results.HOST_TIME_COLUMNS: what each real operation took here
        self.trim_heap = c_heap_trim()

    def timed(self, reply: Message, round_index: int, client: int, kind: str, step: int) -> Message:
        """Keep the host seconds the worker measured for the operation an event of `kind` stands for."""
        self.host_time(round_index, client, kind, step, seconds(reply))
        return reply

    def host_time(self, round_index: int, client: int, kind: str, step: int, host_s: float) -> None:
        """One row of host_times; a request that did two operations (backward_then_forward) gives two."""
        self.host_times.append((round_index, client, kind, step, host_s))

    def worker_of(self, client: int) -> WorkerConnection:
        """Clients are dealt to client workers in turn."""
        return self.client_workers[client % len(self.client_workers)]

    def batch(self, client_indices: np.ndarray, round_index: int, steps: int, step: int) -> np.ndarray:
        training = self.scenario.training
        return batch_indices(client_indices, training.batch_size, (round_index - 1) * steps + step,
                             self.scenario.seed)

    def configure(self, client, adapter, ranks, scaling, split=None, optimizer=None, regulariser=None) -> None:
        args = {"adapter": adapter, "scaling": scaling, "ranks": ranks_to_wire(ranks), **(optimizer or {})}
        if split is not None:
            args["split"] = split
        if regulariser is not None:
            args["tail_penalty"] = regulariser
        self._call(client, "configure", args)

    def reshape(self, client, adapter, ranks, split=None) -> None:
        args = {"adapter": adapter, "ranks": ranks_to_wire(ranks)}
        if split is not None:
            args["split"] = split
        self._call(client, "reshape", args)

    def adapter(self, client, adapter) -> dict:
        reply = self._call(client, "get_adapter", {"adapter": adapter})
        return {key: np.array(value) for key, value in reply.tensors.items()}

    def _call(self, client, op: str, args: dict) -> Message:
        """An op on the server (client None) or on the worker hosting the client."""
        if client is None:
            return self.server.call(op, args=args)
        return self.worker_of(client).call(op, client=client, args=args)

    def setup_full(self, optimizer) -> None:
        self.server.call("setup_full", args=optimizer)

    def split_work(self, round_index, client, adapter, server_adapter, split, costs, measure,
                   on_importance) -> SplitWork:
        return _RealSplitWork(self, round_index, client, adapter, server_adapter, split, costs, measure,
                              on_importance)

    def probe_work(self, client, split, costs, measure, on_importance) -> SplitWork:
        return _RealSplitWork(self, 0, client, None, None, split, costs, measure, on_importance)

    def step_work(self, round_index, client, adapter, steps) -> StepWork:
        return _RealStepWork(self, round_index, client, adapter, steps)

    def contributions(self, clients, active, weights, uploads, server_side):
        client_side = {}
        for k, adapter, nbytes in uploads:
            reply = self.worker_of(k).call("get_adapter", client=k, args={"adapter": adapter})
            checked_bytes(reply, nbytes, "adapter upload")
            client_side[k] = dict(reply.tensors)
        servers = {name: dict(self.server.call("get_adapter", args={"adapter": name}).tensors) for name in server_side}
        return Contributions(clients, active, weights, client_side, servers)

    def aggregate(self, algorithm, contributions, planned):
        outcome = algorithm.aggregate(contributions)
        for what, value in outcome.measured.items():
            check_equal(value, planned.predicted[what], f"{what} of {algorithm.name}'s aggregation")
        self.stats.agg_error = relative_error(outcome.used, outcome.exact)
        return outcome

    def apply(self, algorithm, outcome) -> None:
        restart = algorithm.restarts_optimizer
        for k, tensors in outcome.client_adapters.items():
            self.worker_of(k).call("set_adapter", client=k, args={
                "adapter": algorithm.client_adapter(k), "restart_optimizer": restart}, tensors=tensors)
        for name, tensors in outcome.server_adapters.items():
            self.server.call("set_adapter", args={"adapter": name, "restart_optimizer": restart}, tensors=tensors)
        if outcome.merge is not None:
            flat = {}
            for path, (b, a) in outcome.merge.items():
                flat[f"{path}.B"], flat[f"{path}.A"] = b, a
            for worker in self.workers:
                worker.call("merge", tensors=flat)

    def evaluate(self, adapters) -> float:
        reply = self.server.call("evaluate", args={"adapters": adapters,
                                                   "batch_size": self.scenario.training.batch_size})
        return reply.header["result"]["loss"]

    def outputs(self, adapters) -> tuple[dict, dict]:
        """The test MRs decoded greedily by the final global model, scored against all their references."""
        if not self.scenario.data.test_examples:
            return {}, {}
        from hsplit_sim.textmetrics import score_corpus, unavailable_metrics

        result = self.server.call("generate", args={"adapters": adapters, "batch_size": 16}).header["result"]
        rows = [{"mr": mr, "hypothesis": hypothesis, "references": "\n".join(refs)}
                for mr, hypothesis, refs in zip(result["mrs"], result["hypotheses"], result["references"])]
        scores = score_corpus(result["hypotheses"], result["references"])
        log.info("generation scores: %s", scores)
        return {"generations": rows}, {"generation": scores, "generation_unavailable": unavailable_metrics()}

    def plans(self, round_index, proposed, previous) -> list:
        return proposed

    def settle(self) -> None:
        for worker in self.workers:
            worker.settle()

    def round_done(self, round_index, events, order_sensitive) -> dict:
        return {}

    def take_host_times(self) -> list[dict]:
        rows, self.host_times = self.host_times, []
        return [dict(zip(HOST_TIME_COLUMNS, row)) for row in rows]

    def state(self, put) -> dict[str, dict]:
        """Every worker's dump_state, page by page (each page asked of all the workers that have more at once):
        each tensor to `put(worker name, name, array)` as its page arrives, the JSON states returned. Every merge
        goes to every worker (apply), so the base weights merges changed are the same on all: only the server's
        dump carries their values."""
        self._trim()
        chunks = {worker.name: {} for worker in self.workers}  # each worker's JSON state, as wire.json_arrays
        starts = {worker.name: 0 for worker in self.workers}  # where each worker's next page starts
        while starts:
            pending = [(worker, worker.send("dump_state", args={"merged_values": worker is self.server,
                                                                "start": starts[worker.name]}))
                       for worker in self.workers if worker.name in starts]
            for worker, request_id in pending:
                reply = worker.reply("dump_state", request_id)
                for name, array in reply.tensors.items():
                    if name.startswith(JSON_PREFIX):
                        chunks[worker.name][name] = array
                    else:
                        put(worker.name, name, array)
                starts[worker.name] = reply.header["result"]["next"]
            starts = {name: start for name, start in starts.items() if start is not None}
        self._trim()
        return {name: from_json_arrays(held)[0] for name, held in chunks.items()}

    def _trim(self) -> None:
        """Before and after a checkpoint's pages, the heap's free pages go back: the round's uploads (freed once
        aggregated) and the pages' frames leave them, and at 1,000 tiny FedLoRA clients the coordinator went into
        each checkpoint and the next round holding 60 to 140 MiB of them."""
        if self.trim_heap is not None:
            self.trim_heap(0)

    def restore(self, state) -> None:
        """Each worker's part of a checkpoint back into it with load_state, page by page as state() took it."""
        if set(state) != {worker.name for worker in self.workers}:
            raise RunError(f"the checkpoint holds workers {sorted(state)}, this run has "
                           f"{sorted(worker.name for worker in self.workers)}")
        merged = {key: value for key, value in state["server"][1].items() if key.startswith("merged.")}
        arrays = {name: {**json_arrays(held), **merged, **tensors} for name, (held, tensors) in state.items()}
        starts = {worker.name: 0 for worker in self.workers}
        while starts:
            pending = []
            for worker in self.workers:
                if worker.name in starts:
                    part, following = page(arrays[worker.name], starts[worker.name])
                    pending.append((worker, worker.send("load_state", tensors=part, args={
                        "start": starts[worker.name], "last": following is None}), following))
            for worker, request_id, following in pending:
                worker.reply("load_state", request_id)
                starts[worker.name] = following
            starts = {name: start for name, start in starts.items() if start is not None}

    @property
    def workers(self) -> list[WorkerConnection]:
        return [self.server, *self.client_workers]


class _RealSplitWork(SplitWork):
    """Forward on the client's worker, the step on the server worker, backward on the client's worker. Without
    adapters (None), the base model's probe before training: nothing trains.

    A client's backward and its next forward travel as one request. With backend.overlap_split, requests are
    deferred (WorkerConnection.defer) and their replies taken where something needs them: the server steps one
    client while the client worker runs another's backward and next forward. Each worker still does its
    requests in the simulated order, so nothing it computes changes. A probing backward is awaited: its
    importance is read at the round's end."""

    def __init__(self, backend: RealBackend, round_index, client, adapter, server_adapter, split, costs, measure,
                 on_importance):
        self.backend, self.round, self.client = backend, round_index, client
        self.adapter, self.server_adapter, self.split, self.costs = adapter, server_adapter, split, costs
        self.measure, self.on_importance = measure, on_importance
        self.worker = backend.worker_of(client)
        self.steps = backend.scenario.training.local_steps
        self.smashed = self.reply = None

    def _forward_request(self, step, probe) -> tuple[dict, np.ndarray]:
        # round 0 is IWI's probe before training: the batch of the client's first training step
        batch = self.backend.batch(self.backend.partitions[self.client], max(self.round, 1), self.steps, step)
        return {"adapter": self.adapter, "split": self.split, "probe": probe, "measure": self.measure}, batch

    def _uploaded(self, reply: Message, step: int, host_s: float) -> None:
        self.backend.host_time(self.round, self.client, "client_fwd", step, host_s)
        checked_bytes(reply, self.costs.host_up, "upload of activations")
        self.smashed = reply

    def forward(self, step, probe) -> None:
        args, batch = self._forward_request(step, probe)
        self._send(self.worker, "forward", lambda reply: self._uploaded(reply, step, seconds(reply)),
                   client=self.client, args=args, tensors={"batch": batch})

    def server(self, step, probe) -> None:
        if self.smashed is None:  # its forward is the client worker's outstanding request
            self.worker.settle()

        def stepped(reply: Message) -> None:
            self.backend.timed(reply, self.round, self.client, "server_step", step)
            if self.adapter is not None:  # a training step's loss, not the probe's
                self.backend.stats.losses.append(reply.header["result"]["loss"])
            checked_bytes(reply, self.costs.host_down, "download of gradients")
            self.reply = reply

        self._send(self.backend.server, "step", stepped, client=self.client, tensors=self.smashed.tensors, args={
            "adapter": self.server_adapter, "split": self.split, "probe": probe, "measure": self.measure})
        self.smashed = None  # a client's activations are held here from its forward to the server step only

    def backward(self, step, probe) -> None:
        self._backward(step, probe, None)

    def backward_then_forward(self, step, probe, next_probe) -> None:
        self._backward(step, probe, next_probe)

    def _backward(self, step, probe, next_probe) -> None:
        """The backward of `step`, and with next_probe (not None) the forward of step + 1 in the same request."""
        if self.reply is None:  # its server step is the server's outstanding request
            self.backend.server.settle()
        server_result, args, tensors = self.reply.header["result"], {"adapter": self.adapter}, {
            "grad": self.reply.tensors["grad"]}
        self.reply = None  # and its activation gradients until its backward
        if next_probe is not None:
            args["forward"], tensors["batch"] = self._forward_request(step + 1, next_probe)

        def done(reply: Message) -> None:
            result = reply.header["result"]
            forward_s = result.get("forward_s", 0.0)
            self.backend.host_time(self.round, self.client, "client_bwd", step, seconds(reply) - forward_s)
            if probe:
                self.on_importance(self.client, {**result["importance"], **server_result["importance"]})
            if next_probe is not None:
                self._uploaded(reply, step + 1, forward_s)

        self._send(self.worker, "backward", done, client=self.client, args=args, tensors=tensors)
        if probe:
            self.worker.settle()

    def _send(self, worker: WorkerConnection, op: str, on_reply, **request) -> None:
        worker.defer(op, on_reply, **request)
        if not self.backend.overlap_split:
            worker.settle()

    def stop(self) -> None:
        self.worker.call("forget", client=self.client)


class _RealStepWork(StepWork):
    """Whole-model steps: on a client's worker with its adapter, or on the server over the pooled data."""

    def __init__(self, backend: RealBackend, round_index, client, adapter, steps):
        self.backend, self.round, self.client, self.adapter, self.steps = backend, round_index, client, adapter, steps
        if client is None:
            self.worker, self.indices = backend.server, np.sort(np.concatenate(backend.partitions))
        else:
            self.worker, self.indices = backend.worker_of(client), backend.partitions[client]

    def step(self, step) -> None:
        """Deferred (WorkerConnection.defer): only the loss comes back, so clients on other workers train at once."""
        batch = self.backend.batch(self.indices, self.round, self.steps, step)
        kind, client = ("central_step", -1) if self.client is None else ("client_step", self.client)

        def done(reply: Message) -> None:
            self.backend.timed(reply, self.round, client, kind, step)
            self.backend.stats.losses.append(reply.header["result"]["loss"])

        self.worker.defer("full_step", done, client=self.client, args={"adapter": self.adapter},
                          tensors={"batch": batch})
