"""A worker process: serves requests over ZeroMQ, one at a time, and hands the real work to a training role.

Every header is validated; a malformed or unknown request gets an error reply and the worker keeps
serving. The worker exits when asked, or when the process that started it is gone (heartbeat.py).

A worker started by hand (`hsplit-sim worker`, serve_by_hand) outlives its runs: it serves one run at a time, a
session that its `init` opens with a session id every later request of that run carries, so that another
coordinator holding the same key file is refused instead of served in the middle of the run. The session ends with
the run's `shutdown`, or when its coordinator is gone (heartbeat.SessionBeat); the worker then drops the model and
listens for the next coordinator. A `shutdown` outside any session stops the worker.

Its REP socket is a CurveZMQ server that admits only the coordinator's key (keys.py), and refuses any frame
over the run's frame limit (`--max-frame`, ZMQ_MAXMSGSIZE) before reading it. It reads its keys from stdin, one
JSON line `{"keys": {"public": Z85, "secret": Z85}, "coordinator": Z85}`, which the coordinator writes into a
pipe and closes: nothing secret is on the command line, in the environment or on disk.
"""

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import zmq

from hsplit_sim.runtime.heartbeat import COORDINATOR_TIMEOUT_S, SessionBeat, start_beating
from hsplit_sim.runtime.keys import Gate, Keypair, as_server, checked_key, load_key_file, max_msgsize
from hsplit_sim.runtime.wire import Message, ProtocolError, decode, encode, frame_bytes


class SessionError(Exception):
    """A request a hand-started worker refuses because it belongs to no run it serves now."""


class Worker:
    def __init__(self, name: str, frame_limit: int, by_hand: Keypair | None = None):
        """frame_limit: the largest frame this worker sends or takes; by_hand: a hand-started worker's key pair
        (the key file's), which makes it serve runs in sessions."""
        self.name = name
        self.role = None
        self.max_frame = self.frame_limit = frame_limit
        self.by_hand = by_hand
        self.session: str | None = None
        self.beat: SessionBeat | None = None
        self.ended: tuple[str, str] | None = None  # the last session's id and why it ended
        self.done = False

    def handle(self, message: Message, peer: str | None = None) -> tuple[dict, dict]:
        """(result, tensors) of one request; raises for anything the caller should answer with an error. peer: the
        address the request came from (a hand-started worker sends its heartbeats there)."""
        header = message.header
        op, client, args = header["op"], header.get("client"), header.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict) or not (client is None or isinstance(client, int)):
            raise ProtocolError("op must be a string, args an object and client an integer or null")
        if self.by_hand is not None and op != "ping":
            return self._in_session(op, header.get("session"), client, args, message, peer)
        if op == "shutdown":
            self.done = True
            return {}, {}
        return self._op(op, client, args, message)

    def _op(self, op: str, client, args: dict, message: Message) -> tuple[dict, dict]:
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

    def _in_session(self, op: str, session, client, args: dict, message: Message, peer: str | None):
        """A hand-started worker: `init` with args.session opens a session, every later request must name it, and
        `shutdown` ends it (or, outside any session and naming none, stops the worker)."""
        if self.session is None:
            if op == "shutdown" and session is None:
                self.done = True
                return {}, {}
            if self.ended is not None and session == self.ended[0]:
                raise SessionError(f"{op!r} refused: this worker ended the run's session ({self.ended[1]})")
            if op != "init":
                raise SessionError(f"{op!r} refused: this worker serves no run now (a run's session starts with "
                                   "its init)")
            return self._open(args, peer)
        if session != self.session:
            raise SessionError(f"{op!r} refused: this worker is serving another run (a coordinator with the same "
                               "key file)")
        if op == "init":
            raise SessionError("init twice in one session")
        if op == "shutdown":
            self.end_session("its coordinator ended the run")
            return {}, {}
        return self._op(op, client, args, message)

    def _open(self, args: dict, peer: str | None) -> tuple[dict, dict]:
        """args.session: {"id", "name" (the worker's name in the run), "heartbeat" (the coordinator's heartbeat
        endpoint; a wildcard host means the address the request came from), "frame_limit"}. The worker beats before
        the model loads, takes the run's frame limit up to its own maximum, and replies with the limit it took."""
        session = args.pop("session", None)
        types = {"id": str, "name": str, "heartbeat": str, "frame_limit": int}
        if not (isinstance(session, dict) and all(isinstance(session.get(k), t) for k, t in types.items())):
            raise ProtocolError("a hand-started worker's init needs args.session {id, name, heartbeat, frame_limit}")
        endpoint = session["heartbeat"]
        for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
            if endpoint.startswith(wildcard) and peer:
                endpoint = f"tcp://{f'[{peer}]' if ':' in peer else peer}:" + endpoint.removeprefix(wildcard)
        self.session, self.frame_limit = session["id"], min(session["frame_limit"], self.max_frame)
        self.beat = SessionBeat(session["name"], endpoint, self.by_hand, self.by_hand.public)
        print(f"worker {self.name}: serving a run as {session['name']} (heartbeats to {endpoint}, frames up to "
              f"{self.frame_limit:,} bytes)", file=sys.stderr, flush=True)
        try:
            result, tensors = self._op("init", None, args, None)
        except BaseException:
            self.end_session("its init failed")
            raise
        return dict(result, frame_limit=self.frame_limit), tensors

    def end_session(self, why: str) -> None:
        """Drop the run's model and heartbeats and listen for the next coordinator."""
        self.beat.stop()
        self.ended = (self.session, why)
        self.session, self.beat, self.role, self.frame_limit = None, None, None, self.max_frame
        gc.collect()
        print(f"worker {self.name}: session ended ({why}); listening for the next run", file=sys.stderr, flush=True)


def serve(name: str, endpoint: str, keys: Keypair, coordinator: bytes, frame_limit: int,
          on_bound=None, by_hand: bool = False) -> None:
    """Bind endpoint and answer requests until `shutdown` (or an exception, KeyboardInterrupt included); an
    endpoint that cannot be bound raises OSError. on_bound(endpoint) is called once bound, with the port of a
    tcp://HOST:* endpoint filled in. by_hand: serve runs in sessions (module docstring)."""
    context = zmq.Context()
    gate = Gate(context, [coordinator], name=f"worker {name}")  # before the bind: no handshake goes unchecked
    sock = context.socket(zmq.REP)
    worker = Worker(name, frame_limit, keys if by_hand else None)
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
        _answer(sock, worker)
    finally:
        if worker.session is not None:
            worker.end_session("the worker stops")
        sock.close()
        gate.close()
        context.term()


def _answer(sock: zmq.Socket, worker: Worker) -> None:
    while not worker.done:
        if worker.beat is not None and worker.beat.gone.is_set():
            worker.end_session(f"its coordinator is gone: no heartbeat connection for {COORDINATOR_TIMEOUT_S:.0f} s")
        if not sock.poll(200):
            continue
        frames = sock.recv_multipart(copy=False)
        request_id = None
        try:
            message = decode(frames, required=("op", "id"))
            request_id = message.header["id"]
            if frame_bytes(frames) > worker.frame_limit:  # a hand-started worker's run may set less than it takes
                raise ProtocolError(f"a frame of {frame_bytes(frames):,} bytes exceeds the run's frame limit of "
                                    f"{worker.frame_limit:,} bytes")
            started = time.perf_counter()
            result, tensors = worker.handle(message, _peer(frames[0]) if worker.by_hand else None)
            seconds = time.perf_counter() - started  # the host's measurement, beside the simulated duration
            frames = encode({"id": request_id, "ok": True, "result": result, "seconds": seconds}, tensors)
            if frame_bytes(frames) > worker.frame_limit:  # the coordinator would drop it unread and wait for ever
                raise RuntimeError(f"a reply frame of {frame_bytes(frames):,} bytes exceeds the run's frame limit of "
                                   f"{worker.frame_limit:,} bytes (a bug in the limit's derivation)")
            sock.send_multipart(frames, copy=False)
        except ProtocolError as exc:
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"malformed request: {exc}"}))
        except SessionError as exc:
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": str(exc)}))
        except Exception as exc:  # noqa: BLE001 - any failure of one request becomes its error reply
            traceback.print_exc(file=sys.stderr)
            sock.send_multipart(encode({"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}))


def _peer(frame: zmq.Frame) -> str | None:
    """The address a tcp request came from (libzmq's Peer-Address property); None over ipc."""
    try:
        return frame.get("Peer-Address") or None
    except zmq.ZMQError:
        return None


def serve_by_hand(listen: str, key_file: str, name: str, frame_limit: int, announce) -> None:
    """`hsplit-sim worker --listen ADDR --key FILE`: a worker started by hand, whose key pair is the key file's and
    which admits only the key file's public key, that is a coordinator whose runtime.key_file is a copy of the same
    file. It serves runs one at a time (module docstring), each telling it at init where to send heartbeats and its
    frame limit (up to frame_limit), until a `shutdown` outside a session, Ctrl-C or SIGTERM. announce(text) tells
    where it listens. Errors: KeyFileError, OSError."""
    keys = load_key_file(Path(key_file))
    serve(name, listen, keys, keys.public, frame_limit, by_hand=True,
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
    # The run is over and every socket closed: the interpreter's teardown (torch's modules and the model's memory)
    # would add 1 to 3 s to the end of every run, and nothing is left to save but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
