"""How long work takes: the time model turns the cost model's work and bytes into simulated seconds.

Every simulated duration comes from here, through the fleet's devices, links and server (fleet.py); algorithms
state work (costs.Work) and bytes and never divide by a rate.
"""

from dataclasses import dataclass

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


def client_seconds(work, client) -> float:
    """Work on a client's own device in its number format (a ClientSpec: planning happens before the fleet)."""
    return compute_seconds(work, client.device, client.precision)


def transfer_seconds(nbytes: float, mbps: float, latency_ms: float) -> float:
    """One message over a link: latency plus serialisation at the link rate."""
    return latency_ms / 1000 + nbytes * 8 / (mbps * 1e6)


@dataclass(frozen=True)
class SplitIterationEstimate:
    """One split iteration of a client, as HSplitLoRA's ARMSC weighs a split point: its compute (forward,
    backward and optimiser step), the smashed data up, its share of the server (its own server step times the
    clients taking turns on one server copy), the gradient down."""

    client_s: float
    upload_s: float
    server_s: float
    download_s: float

    @property
    def total_s(self) -> float:
        return self.client_s + self.upload_s + self.server_s + self.download_s


def split_iteration_estimate(client_work, server_work, up_bytes: int, down_bytes: int, client, server_device,
                             server_precision: str, server_turns: float) -> SplitIterationEstimate:
    """The nominal estimate: the client's device and link at their catalog rates (no jitter, traces or shared
    medium), and every client of its server copy queueing once per iteration (`server_turns` server steps)."""
    link = client.link
    return SplitIterationEstimate(
        client_seconds(client_work, client),
        transfer_seconds(up_bytes, link.up_mbps, link.latency_ms),
        server_turns * compute_seconds(server_work, server_device, server_precision),
        transfer_seconds(down_bytes, link.down_mbps, link.latency_ms))
