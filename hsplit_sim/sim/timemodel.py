"""How long work takes: the time model turns the cost model's work and bytes into simulated seconds.

Every simulated duration comes from here, through the fleet's devices, links and server (fleet.py); algorithms
state work (costs.Work) and bytes and never divide by a rate.
"""

from hsplit_sim.scenario.schema import ELEMENT_BYTES


def compute_seconds(work, device, precision: str = "fp32") -> float:
    """A roofline sum over the work's operations: each matmul takes the longer of its FLOPs at the device's
    peak rate in the number format times its efficiency and its values at the memory bandwidth; memory-bound
    operations take their values at the bandwidth; every kernel adds the device's launch overhead. A device
    without a bandwidth or an overhead is not charged for that term."""
    rate = device.peak_tflops(precision) * 1e12 * device.efficiency
    value_bytes = ELEMENT_BYTES[precision]
    bandwidth = device.memory_bandwidth_gbps
    if bandwidth is None:
        seconds = sum(count * flops for count, flops, _ in work.matmuls) / rate
    else:
        per_value = value_bytes / (bandwidth * 1e9)
        seconds = sum(count * max(flops / rate, values * per_value) for count, flops, values in work.matmuls)
        seconds += work.pointwise_values * per_value
    if device.launch_overhead_us is not None:
        seconds += work.kernels * device.launch_overhead_us * 1e-6
    return seconds


def transfer_seconds(nbytes: float, mbps: float, latency_ms: float) -> float:
    """One message over a link: latency plus serialisation at the link rate."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)
