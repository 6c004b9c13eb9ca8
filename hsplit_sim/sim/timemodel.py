"""How long work takes: the time model turns the cost model's FLOPs and bytes into simulated seconds.

Every simulated duration comes from here, through the fleet's devices, links and server (fleet.py); algorithms
state FLOPs and bytes and never divide by a rate. A budget in seconds (HSplitLoRA's time_budget_s) is turned
into FLOPs here too, so the two directions cannot drift apart.
"""


def compute_seconds(flops: float, device, precision: str = "fp32") -> float:
    """A compute step at the device's peak rate in the number format times the fraction of it reached (its
    efficiency)."""
    return flops / (device.peak_tflops(precision) * 1e12 * device.efficiency)


def flops_within(seconds: float, device, precision: str = "fp32") -> float:
    """The FLOPs a device computes in `seconds`: the inverse of compute_seconds."""
    return seconds * device.peak_tflops(precision) * 1e12 * device.efficiency


def transfer_seconds(nbytes: float, mbps: float, latency_ms: float) -> float:
    """One message over a link: latency plus serialisation at the link rate."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)
