"""Ctrl-C and SIGTERM end a run as "interrupted". The interrupt can land while a request is in flight, which
leaves that ZeroMQ REQ socket waiting for its reply; so once a stop is requested, every later request (other
than the shutdown that ends the run) raises KeyboardInterrupt instead of touching a socket."""

import signal

_requested = False


def requested() -> bool:
    return _requested


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def install() -> None:
    """Call from the main thread of the command line (a scheduler's kill sends SIGTERM)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
