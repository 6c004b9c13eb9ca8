"""A worker process: serves requests over ZeroMQ, one at a time, and hands the real work to a training role.

Every header is validated; a malformed or unknown request gets an error reply and the worker keeps
serving. The worker exits when asked, or when the process that started it is gone (heartbeat.py).
"""

import argparse
import os
import sys
import time
import traceback

import zmq

from hsplit_sim.runtime.heartbeat import start_beating
from hsplit_sim.runtime.wire import Message, ProtocolError, decode, encode


class Worker:
    def __init__(self, name: str):
        self.name = name
        self.role = None

    def handle(self, message: Message) -> tuple[dict, dict]:
        """(result, tensors) of one request; raises for anything the caller should answer with an error."""
        header = message.header
        op, client, args = header["op"], header.get("client"), header.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict) or not (client is None or isinstance(client, int)):
            raise ProtocolError("op must be a string, args an object and client an integer or null")
        if op == "shutdown":
            return {}, {}
        if op == "ping":
            return {"name": self.name, "pid": os.getpid()}, {}
        if op == "init":
            from hsplit_sim.training.roles import make_role  # torch loads here, not at import

            self.role = make_role(args)
            return self.role.init_result()
        if self.role is None:
            raise ProtocolError(f"{op!r} before init")
        method = self.role.ops().get(op)
        if method is None:
            raise ProtocolError(f"unknown op {op!r}; this worker knows {sorted(self.role.ops())}")
        return method(client, args, message.tensors)


def serve(name: str, endpoint: str) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(endpoint)
    worker = Worker(name)
    while True:
        frames = sock.recv_multipart(copy=False)
        request_id = op = None
        try:
            message = decode(frames, required=("op", "id"))
            request_id, op = message.header["id"], message.header["op"]
            started = time.perf_counter()
            result, tensors = worker.handle(message)
            seconds = time.perf_counter() - started  # the host's measurement, beside the simulated duration
            sock.send_multipart(encode({"id": request_id, "ok": True, "result": result, "seconds": seconds},
                                       tensors), copy=False)
        except ProtocolError as exc:
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"malformed request: {exc}"}))
        except Exception as exc:  # noqa: BLE001 - any failure of one request becomes its error reply
            traceback.print_exc(file=sys.stderr)
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        if op == "shutdown":
            break
    sock.close()
    context.term()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="hsplit-sim worker process")
    parser.add_argument("--name", required=True)
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--heartbeat", required=True, help="the coordinator's heartbeat endpoint to connect to")
    parser.add_argument("--parent", required=True, type=int, help="the coordinator's pid: the worker exits without it")
    args = parser.parse_args(argv)
    start_beating(args.name, args.heartbeat, args.parent, args.endpoint)
    serve(args.name, args.endpoint)


if __name__ == "__main__":
    main()
