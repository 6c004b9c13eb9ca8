"""Ctrl-C and SIGTERM end a run as "interrupted". The interrupt can land while a request is in flight, which
leaves that ZeroMQ REQ socket waiting for its reply; so once a stop is requested, every later request (other
than the shutdown that ends the run) raises KeyboardInterrupt instead of touching a socket."""

import contextlib
import signal

_requested = False
_deferring = False
_deferred = False


def requested() -> bool:
    return _requested


def _on_signal(signum, frame) -> None:
    global _requested, _deferred
    _requested = True
    if _deferring:
        _deferred = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Cleanup that a second Ctrl-C must not cut short (it would leave worker processes and the socket folder
    behind): a signal that arrives inside is raised as KeyboardInterrupt once the block has ended, unless the block
    already ends with an exception."""
    global _deferring, _deferred
    _deferring, _deferred = True, False
    try:
        yield
    finally:
        _deferring = False
    if _deferred:
        raise KeyboardInterrupt


def install() -> None:
    """Call from the main thread of the command line (a scheduler's kill sends SIGTERM)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
