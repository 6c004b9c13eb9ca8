"""A worker process: serves requests over ZeroMQ, one at a time, and hands the real work to a training role.

Every header is validated; a malformed or unknown request gets an error reply and the worker keeps
serving. The worker exits when asked, or when the process that started it is gone (heartbeat.py).

Its REP socket is a CurveZMQ server that admits only the coordinator's key (keys.py), and refuses any frame
over the run's frame limit (`--max-frame`, ZMQ_MAXMSGSIZE) before reading it. It reads its keys from stdin, one
JSON line `{"keys": {"public": Z85, "secret": Z85}, "coordinator": Z85}`, which the coordinator writes into a
pipe and closes: nothing secret is on the command line, in the environment or on disk.
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import zmq

from hsplit_sim.runtime.heartbeat import start_beating
from hsplit_sim.runtime.keys import Gate, Keypair, as_server, checked_key, load_key_file, max_msgsize
from hsplit_sim.runtime.wire import Message, ProtocolError, decode, encode, frame_bytes


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


def serve(name: str, endpoint: str, keys: Keypair, coordinator: bytes, frame_limit: int,
          on_bound=None) -> None:
    """Bind endpoint and answer requests until `shutdown` (or an exception, KeyboardInterrupt included); an
    endpoint that cannot be bound raises OSError. on_bound(endpoint) is called once bound, with the port of a
    tcp://HOST:* endpoint filled in."""
    context = zmq.Context()
    gate = Gate(context, [coordinator], name=f"worker {name}")  # before the bind: no handshake goes unchecked
    sock = context.socket(zmq.REP)
    try:
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msgsize(frame_limit))
        as_server(sock, keys)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot listen on {endpoint} ({exc})") from None
        if on_bound is not None:
            on_bound(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        _answer(sock, Worker(name), frame_limit)
    finally:
        sock.close()
        gate.close()
        context.term()


def _answer(sock: zmq.Socket, worker: Worker, frame_limit: int) -> None:
    while True:
        frames = sock.recv_multipart(copy=False)
        request_id = op = None
        try:
            message = decode(frames, required=("op", "id"))
            request_id, op = message.header["id"], message.header["op"]
            started = time.perf_counter()
            result, tensors = worker.handle(message)
            seconds = time.perf_counter() - started  # the host's measurement, beside the simulated duration
            frames = encode({"id": request_id, "ok": True, "result": result, "seconds": seconds}, tensors)
            if frame_bytes(frames) > frame_limit:  # the coordinator would drop it unread and wait for ever
                raise RuntimeError(f"a reply frame of {frame_bytes(frames):,} bytes exceeds the run's frame limit of "
                                   f"{frame_limit:,} bytes (a bug in the limit's derivation)")
            sock.send_multipart(frames, copy=False)
        except ProtocolError as exc:
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"malformed request: {exc}"}))
        except Exception as exc:  # noqa: BLE001 - any failure of one request becomes its error reply
            traceback.print_exc(file=sys.stderr)
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        if op == "shutdown":
            break


def serve_by_hand(listen: str, key_file: str, name: str, frame_limit: int, announce) -> None:
    """`hsplit-sim worker --listen ADDR --key FILE`: a worker started by hand, whose key pair is the key file's and
    which admits only the key file's public key, that is a coordinator whose runtime.key_file is a copy of the same
    file. It sends no heartbeats (it knows no coordinator until one connects) and serves until `shutdown`, Ctrl-C
    or SIGTERM. announce(text) tells where it listens. Errors: KeyFileError, OSError."""
    keys = load_key_file(Path(key_file))
    serve(name, listen, keys, keys.public, frame_limit,
          on_bound=lambda endpoint: announce(f"worker {name} listening on {endpoint} (public key "
                                             f"{keys.public.decode()}, frames up to {frame_limit:,} bytes)"))


def read_keys(stream) -> tuple[Keypair, bytes]:
    """(the worker's key pair, the coordinator's public key) from the one JSON line the coordinator writes; the
    stream is closed after it, and stdin reopened on /dev/null."""
    try:
        line = stream.readline(4096)
        data = json.loads(line)
        return Keypair.from_wire(data["keys"]), checked_key(data["coordinator"], "coordinator key")
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"worker: no keys on stdin ({exc}); a coordinator starts workers, writing their keys into "
                         "their stdin") from None
    finally:
        stream.close()
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="hsplit-sim worker process (its keys come on stdin)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--heartbeat", required=True, help="the coordinator's heartbeat endpoint to connect to")
    parser.add_argument("--parent", required=True, type=int, help="the coordinator's pid: the worker exits without it")
    parser.add_argument("--max-frame", required=True, type=int,
                        help="the run's frame limit in bytes: a larger frame closes its connection unread")
    args = parser.parse_args(argv)
    keys, coordinator = read_keys(sys.stdin)
    start_beating(args.name, args.heartbeat, args.parent, args.endpoint, keys, coordinator)
    serve(args.name, args.endpoint, keys, coordinator, args.max_frame)


if __name__ == "__main__":
    main()
