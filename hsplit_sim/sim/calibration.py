"""Fitting the time model to measured step times: a host's matmul efficiency and launch overhead.

The host's peak rate and memory bandwidth are measured directly (a large matmul, a large element-wise add);
what remains, the fraction of that peak a model's matmuls reach and the seconds each kernel adds, is fitted to
step times of real segments so that the relative error of compute_seconds against them is least.
"""

import numpy as np

from hsplit_sim import costs
from hsplit_sim.scenario.catalog import DeviceSpec
from hsplit_sim.scenario.models import BUILTIN_MODELS
from hsplit_sim.sim.timemodel import compute_seconds

KINDS = ("client_fwd", "client_bwd", "server_step")
TARGETS, RANK = ["q", "v"], 8  # the adapters every calibration step trains: rank 8 on q and v of every block


def step_work(model: str, kind: str, split: int, batch: int, seq: int) -> costs.Work:
    """The work of one kind of split step of a built-in model with the calibration's adapters, as a split run
    charges it (algorithms/protocols/split.py: PlanCosts)."""
    spec = costs.ModelSpec.from_hf_config(BUILTIN_MODELS[model])
    ranks = costs.uniform_ranks(spec, TARGETS, range(spec.n_layers), RANK)
    client_ranks = {layer: modules for layer, modules in ranks.items() if layer < split}
    server_ranks = {layer: modules for layer, modules in ranks.items() if layer >= split}
    if kind in ("client_fwd", "client_bwd"):
        forward, backward = costs.segment_work(spec, 0, split, batch, seq, client_ranks, False, False)
        return forward if kind == "client_fwd" else backward + costs.optimizer_work(spec, client_ranks)
    if kind == "server_step":
        forward, backward = costs.segment_work(spec, split, spec.n_layers, batch, seq, server_ranks, True, True)
        return forward + backward + costs.optimizer_work(spec, server_ranks)
    raise ValueError(f"unknown step kind {kind!r}")


def fit_host(works: list[costs.Work], seconds: list[float], tflops: float,
             bandwidth_gbps: float) -> tuple[float, float]:
    """(efficiency, launch overhead in microseconds) that minimise the squared relative error of the predicted
    step times, given the host's peak rate and bandwidth.

    For a fixed efficiency the prediction is linear in the overhead, so the best overhead has a closed form;
    the efficiency is searched on a log grid, then on a finer one around the best.
    """
    measured = np.asarray(seconds, dtype=float)
    if len(works) != len(measured) or not len(works) or (measured <= 0).any():
        raise ValueError("need one positive measured time per work")
    kernels = np.array([w.kernels for w in works], dtype=float) / measured

    def best_at(efficiency: float) -> tuple[float, float]:
        device = DeviceSpec(tflops=tflops, efficiency=efficiency, memory_gb=1, memory_bandwidth_gbps=bandwidth_gbps)
        rest = np.array([compute_seconds(w, device) for w in works]) / measured - 1
        overhead = max(0.0, -float(kernels @ rest) / float(kernels @ kernels)) if kernels.any() else 0.0
        return float(np.sum((rest + kernels * overhead) ** 2)), overhead

    grid = np.geomspace(1e-3, 1.0, 61)
    for _ in range(3):
        index = int(np.argmin([best_at(e)[0] for e in grid]))
        best = grid[index]
        grid = np.geomspace(grid[max(index - 1, 0)], grid[min(index + 1, len(grid) - 1)], 21)
    _, overhead = best_at(best)
    return float(best), overhead * 1e6


def host_device(name: str, works: list[costs.Work], seconds: list[float], tflops: float, bandwidth_gbps: float,
                memory_gb: float, measured_on: str) -> DeviceSpec:
    """A device entry for this host: measured peak and bandwidth, fitted efficiency and launch overhead, and a
    source that says so."""
    efficiency, overhead_us = fit_host(works, seconds, tflops, bandwidth_gbps)
    device = DeviceSpec(name=name, tflops=round(tflops, 4), efficiency=round(efficiency, 4),
                        memory_bandwidth_gbps=round(bandwidth_gbps, 2), launch_overhead_us=round(overhead_us, 2),
                        memory_gb=round(memory_gb, 1), source="")
    errors = relative_errors(device, works, seconds)
    return device.model_copy(update={"source": (
        f"measured by hsplit-sim calibrate on {measured_on}: peak FP32 = the rate of a 2048 x 2048 fp32 matmul, "
        f"memory bandwidth = an element-wise add over three 128 MiB arrays; efficiency and launch overhead "
        f"fitted to {len(works)} step times of real segments (median relative error "
        f"{np.median(np.abs(errors)):.1%}, worst {np.max(np.abs(errors)):.1%}); no FP16/BF16 rates (the host "
        f"trains in fp32)")})


def relative_errors(device: DeviceSpec, works: list[costs.Work], seconds: list[float]) -> np.ndarray:
    """(predicted - measured) / measured for each step."""
    predicted = np.array([compute_seconds(w, device) for w in works])
    return predicted / np.asarray(seconds, dtype=float) - 1
