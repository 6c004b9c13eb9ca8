"""The real backend's split iterations as requests: each worker gets its requests in the simulated order, while
the server's step on one client is already running when the coordinator takes another client's backward."""

from types import SimpleNamespace

import numpy as np

from hsplit_sim.algorithms.base import RoundStats
from hsplit_sim.backends.real import RealBackend
from hsplit_sim.runtime.wire import Message

HIDDEN = np.zeros((2, 3, 4), dtype=np.float32)


class Worker:
    """A connection whose worker answers at once; it logs when each request is sent and its reply taken."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.pending = name, log, None

    def defer(self, op, on_reply, client=None, args=None, tensors=None):
        self.settle()
        self.log.append((self.name, "send", op, client, "forward" in (args or {})))
        self.pending = (op, client, args or {}, on_reply)

    def settle(self):
        if self.pending is not None:
            op, client, args, on_reply = self.pending
            self.pending = None
            self.log.append((self.name, "reply", op, client, "forward" in args))
            on_reply(self.answer(op, args))

    def answer(self, op, args) -> Message:
        upload = {"hidden": HIDDEN, "labels": np.zeros((2, 3), np.int64), "attention_mask": np.ones((2, 3), np.int64)}
        if op == "forward":
            return Message({"result": {}, "seconds": 0.5}, upload)
        if op == "step":
            return Message({"result": {"loss": float(len(self.log)), "importance": {"server.w": 1.0}},
                            "seconds": 0.25}, {"grad": HIDDEN})
        if "forward" in args:
            return Message({"result": {"importance": {"client.w": 2.0}, "forward_s": 0.5}, "seconds": 0.75}, upload)
        return Message({"result": {"importance": {"client.w": 2.0}}, "seconds": 0.25})


def two_clients_two_steps(overlap: bool) -> tuple[list, dict, RealBackend]:
    """The calls the fast path makes for two clients of two steps, the first a probe, in the Clockwork's order:
    (the log of requests and replies, the importance reported, the backend)."""
    log, importance = [], {}
    server, clients = Worker("server", log), Worker("clients0", log)
    scenario = SimpleNamespace(training=SimpleNamespace(local_steps=2, batch_size=2), seed=0)
    backend = RealBackend(scenario, server, [clients], [np.arange(8), np.arange(8, 16)], RoundStats(),
                          overlap_split=overlap)
    nbytes = sum(a.nbytes for a in clients.answer("forward", {}).tensors.values())
    costs = SimpleNamespace(host_up=nbytes, host_down=HIDDEN.nbytes)
    a, b = (backend.split_work(1, k, f"c{k}", "server", 1, costs, "abs_sum", importance.__setitem__)
            for k in (0, 1))
    a.forward(0, True)
    b.forward(0, True)
    a.server(0, True)
    a.backward_then_forward(0, True, False)
    b.server(0, True)
    b.backward_then_forward(0, True, False)
    a.server(1, False)
    a.backward(1, False)
    b.server(1, False)
    b.backward(1, False)
    backend.settle()
    return log, importance, backend


def test_the_server_steps_one_client_while_the_client_worker_runs_another():
    log, importance, backend = two_clients_two_steps(overlap=True)
    sent = [(worker, op, client, fused) for worker, event, op, client, fused in log if event == "send"]
    assert [s for s in sent if s[0] == "clients0"] == [
        ("clients0", "forward", 0, False), ("clients0", "forward", 1, False), ("clients0", "backward", 0, True),
        ("clients0", "backward", 1, True), ("clients0", "backward", 0, False), ("clients0", "backward", 1, False)]
    assert [s[1:3] for s in sent if s[0] == "server"] == [("step", 0), ("step", 1), ("step", 0), ("step", 1)]
    assert len(log) == 2 * len(sent)  # every reply taken by the round's end
    # a probing backward is awaited (its importance is read at the round's end); a training one is not: the
    # server's step on client 1 goes out before client 0's last backward comes back
    assert log.index(("clients0", "reply", "backward", 0, True)) < log.index(("server", "send", "step", 1, False))
    last_step = max(i for i, entry in enumerate(log) if entry == ("server", "send", "step", 1, False))
    assert last_step < log.index(("clients0", "reply", "backward", 0, False))
    assert importance == {0: {"client.w": 2.0, "server.w": 1.0}, 1: {"client.w": 2.0, "server.w": 1.0}}
    assert len(backend.stats.losses) == 4
    rows = backend.take_host_times()
    assert sorted((r["kind"], r["client"], r["step"], r["host_s"]) for r in rows) == sorted(
        [("client_fwd", k, s, 0.5) for k in (0, 1) for s in (0, 1)]
        + [("server_step", k, s, 0.25) for k in (0, 1) for s in (0, 1)]
        + [("client_bwd", k, s, 0.25) for k in (0, 1) for s in (0, 1)])


def test_sharing_cores_each_request_is_answered_before_the_next():
    """Where the server and the client workers share cores, overlapping them measured slower: every reply is
    taken right after its request, as one request at a time, but a backward still carries the next forward."""
    overlapped, _, _ = two_clients_two_steps(overlap=True)
    log, importance, backend = two_clients_two_steps(overlap=False)
    for sent, reply in zip(log[0::2], log[1::2]):
        assert (sent[1], reply[1]) == ("send", "reply") and (sent[0], *sent[2:]) == (reply[0], *reply[2:])
    assert [entry for entry in log if entry[1] == "send"] == [entry for entry in overlapped if entry[1] == "send"]
    assert importance == {0: {"client.w": 2.0, "server.w": 1.0}, 1: {"client.w": 2.0, "server.w": 1.0}}
    assert len(backend.stats.losses) == 4
