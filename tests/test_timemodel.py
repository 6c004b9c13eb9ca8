"""The time model: durations from work and bytes, checked on hand-worked examples."""

import subprocess
import sys

import pytest

from hsplit_sim.costs import Work
from hsplit_sim.scenario import DeviceSpec
from hsplit_sim.sim.timemodel import compute_seconds, transfer_seconds


def test_roofline_hand_worked():
    device = DeviceSpec(tflops=10.0, tflops_fp16=20.0, efficiency=0.5, memory_gb=1, memory_bandwidth_gbps=100.0,
                        launch_overhead_us=10.0)
    work = Work(matmuls=((1, 2 * 10**12, 10**9), (2, 10**6, 10**9)), pointwise_values=5 * 10**8, kernels=1000)
    # fp32, 4 bytes a value at 100 GB/s: the big matmul is compute-bound, 2 TFLOP at 10 x 0.5 TFLOP/s = 0.4 s
    # (its 4 GB would take 0.04 s); the small ones are memory-bound, 2 x 4 GB / 100 GB/s = 0.08 s; the
    # pointwise 2 GB take 0.02 s; 1,000 kernels x 10 us = 0.01 s.
    assert compute_seconds(work, device) == pytest.approx(0.4 + 0.08 + 0.02 + 0.01)
    # fp16: twice the rate and half the bytes.
    assert compute_seconds(work, device, "fp16") == pytest.approx(0.2 + 0.04 + 0.01 + 0.01)


def test_terms_a_device_does_not_state_are_not_charged():
    device = DeviceSpec(tflops=10.0, efficiency=0.5, memory_gb=1)
    work = Work(matmuls=((1, 2 * 10**12, 10**12),), pointwise_values=10**12, kernels=10**6)
    assert compute_seconds(work, device) == pytest.approx(0.4)


def test_transfer_hand_worked():
    # 1 MB over 8 Mbit/s with 20 ms latency: 0.02 + 8e6 / 8e6 = 1.02 s.
    assert transfer_seconds(1_000_000, 8.0, 20.0) == pytest.approx(1.02)


def test_sim_does_not_import_torch():
    code = "import sys, hsplit_sim.sim; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
