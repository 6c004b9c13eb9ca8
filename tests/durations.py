"""Durations written out as the time model states them, for tests to check simulated events against."""

VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def seconds(work, device, precision: str = "fp32") -> float:
    """A compute step's duration, written out here as the time model states it: per matmul the longer of FLOPs /
    (peak x efficiency) and bytes / bandwidth, the memory-bound values' bytes / bandwidth, and kernels x launch
    overhead."""
    rate = device.peak_tflops(precision) * 1e12 * device.efficiency
    bandwidth = device.memory_bandwidth_gbps * 1e9 / VALUE_BYTES[precision]  # values a second
    total = sum(count * max(flops / rate, values / bandwidth) for count, flops, values in work.matmuls)
    return total + work.pointwise_values / bandwidth + work.kernels * device.launch_overhead_us / 1e6


def transfer(nbytes: int, mbps: float, latency_ms: float) -> float:
    """A message's duration over a link: latency plus bits / rate."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)
