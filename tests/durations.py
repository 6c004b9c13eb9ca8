"""Durations written out as the time model states them, for tests to check simulated events against."""


def seconds(flops: float, device) -> float:
    """A compute step's duration, written out here as the time model states it: FLOPs / (peak x efficiency)."""
    return flops / (device.tflops * 1e12 * device.efficiency)


def transfer(nbytes: int, mbps: float, latency_ms: float) -> float:
    """A message's duration over a link: latency plus bits / rate."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)
