"""CurveZMQ on every socket of a run, and a ZAP handler that admits only the keys of the run.

Who is the CurveZMQ server: whoever binds. Each worker binds its REP socket as a server with its own key pair and
admits one client key, the coordinator's; the coordinator binds the heartbeat PULL socket as a server with its own
key pair and admits the workers' keys. Every REQ and PUSH socket is a client that knows its server's public key
(so it cannot be led to a stranger) and shows its own. A peer without the right key fails the handshake: its
frames never reach the application, whatever transport (ipc or tcp) carries them.

Keys: a run makes a key pair for its coordinator and one for each worker it starts (`Keypair.new`); the worker
reads its pair and the coordinator's public key from its stdin, a pipe only its parent holds, so no secret is on
a command line (`ps`), in the environment (inherited by every child) or on disk. A run whose scenario names
`runtime.key_file` takes its coordinator's key pair from that file instead (`load_key_file`, written by
`write_key_file`: the certificate format of `zmq.auth.create_certificates`, mode 0600).

Cost: the handshake (a few public-key operations) once per connection; then every frame is encrypted by its
sender and decrypted by its receiver (XSalsa20-Poly1305, libsodium inside pyzmq's libzmq), one pass each way over
the bytes and 33 bytes on the wire per frame. The ZAP handler runs only at handshakes, never per message.
"""

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

Z85_KEY_CHARS = 40
# Bytes CurveZMQ adds to every frame on the wire (the MESSAGE command's name, nonce, flags and MAC): what
# ZMQ_MAXMSGSIZE, which libzmq applies to each wire frame before decrypting it, must allow above the payload.
CURVE_FRAME_OVERHEAD = 33
KEY_FILE_MAX_BYTES = 64 * 1024

_SECRET_BANNER = """#   ZeroMQ CURVE **Secret** Certificate, written by hsplit-sim
#   Whoever holds this file can act as the coordinator or a worker of the runs that name it: keep it mode 0600
#   and copy it only over a secure channel (scp, ssh).

"""


class KeyFileError(ValueError):
    """A key file that cannot serve as a run's key."""


@dataclass(frozen=True, repr=False)
class Keypair:
    """A CurveZMQ key pair, both halves Z85-encoded (40 ASCII bytes). Its repr shows the public half only."""

    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> "Keypair":
        return cls(*zmq.curve_keypair())

    def __repr__(self) -> str:
        return f"Keypair(public={self.public.decode()!r})"

    def to_wire(self) -> dict:
        return {"public": self.public.decode(), "secret": self.secret.decode()}

    @classmethod
    def from_wire(cls, data: dict) -> "Keypair":
        return cls(checked_key(data["public"], "public key"), checked_key(data["secret"], "secret key"))


def checked_key(key, what: str) -> bytes:
    """A Z85 key as bytes, or a ValueError naming what is wrong with it."""
    if isinstance(key, str):
        key = key.encode("ascii", errors="replace")
    if not isinstance(key, bytes) or len(key) != Z85_KEY_CHARS:
        raise ValueError(f"{what}: expected {Z85_KEY_CHARS} Z85 characters")
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what}: not Z85") from None
    return key


def as_server(socket: zmq.Socket, own: Keypair) -> None:
    """Make a socket that binds a CurveZMQ server (before bind)."""
    socket.curve_secretkey = own.secret
    socket.curve_publickey = own.public
    socket.curve_server = True


def as_client(socket: zmq.Socket, own: Keypair, server_public: bytes) -> None:
    """Make a socket that connects a CurveZMQ client of the server with that public key (before connect)."""
    socket.curve_secretkey = own.secret
    socket.curve_publickey = own.public
    socket.curve_serverkey = server_public


def max_msgsize(payload_limit: int) -> int:
    """ZMQ_MAXMSGSIZE for frames of at most payload_limit bytes: libzmq checks each frame as it comes off the
    wire, before reading it, so a larger one closes the connection and is never received whole."""
    return payload_limit + CURVE_FRAME_OVERHEAD


class Gate:
    """The ZAP handler of a context: admits CurveZMQ clients with one of the given public keys, refuses all others
    (a NULL or PLAIN client never reaches it: a CURVE server refuses another mechanism at the greeting).
    Start it before the context's server sockets bind; stop it before the context terminates."""

    def __init__(self, context: zmq.Context, admitted=(), name: str = "", log_refusals: int = 5):
        from zmq.auth.thread import ThreadAuthenticator  # asyncio comes with it: imported only where a gate is

        self.admitted: set[bytes] = set(admitted)
        self.refused = 0
        self._name, self._log_refusals = name, log_refusals
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        self._authenticator.configure_curve_callback("*", credentials_provider=self)

    def admit(self, public: bytes) -> None:
        self.admitted.add(public)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator's thread at each handshake."""
        if key in self.admitted:
            return True
        self.refused += 1
        if self.refused <= self._log_refusals:
            print(f"{self._name or 'hsplit-sim'}: refused a connection with an unknown CurveZMQ key "
                  f"{key.decode(errors='replace')}", file=sys.stderr, flush=True)
        return False

    def close(self) -> None:
        self._authenticator.stop()


def write_key_file(path: Path) -> Keypair:
    """A new secret certificate at path (never overwritten), readable by its owner only."""
    keys = Keypair.new()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already: a key file is never overwritten") from None
    except OSError as e:
        raise KeyFileError(f"cannot create {path} ({e.strerror})") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_SECRET_BANNER)
        f.write(f'metadata\ncurve\n    public-key = "{keys.public.decode()}"\n'
                f'    secret-key = "{keys.secret.decode()}"\n')
    return keys


def load_key_file(path: Path) -> Keypair:
    """The key pair of a secret certificate (zmq.auth.create_certificates' `.key_secret` format); a KeyFileError
    when the file is missing, too large, open to other users, lacks a secret key, or holds halves that differ."""
    from zmq.auth.certs import load_certificate

    try:
        info = os.stat(path)
    except OSError as e:
        raise KeyFileError(f"cannot read {path} ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    if info.st_size > KEY_FILE_MAX_BYTES:
        raise KeyFileError(f"{path} is {info.st_size:,} bytes, not a key file (at most {KEY_FILE_MAX_BYTES:,})")
    if info.st_mode & 0o077:
        raise KeyFileError(f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                        f"chmod 600 {path}")
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot read a key from {path} ({e})") from None
    if secret is None:
        raise KeyFileError(f"{path} holds a public key only; a run needs the secret certificate (.key_secret)")
    try:
        keys = Keypair(checked_key(public, "public-key"), checked_key(secret, "secret-key"))
    except ValueError as e:
        raise KeyFileError(f"{path}: {e}") from None
    if zmq.curve_public(keys.secret) != keys.public:
        raise KeyFileError(f"{path}: public-key is not the public half of secret-key")
    return keys
