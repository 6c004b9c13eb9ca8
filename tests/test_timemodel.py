"""The time model: durations from FLOPs and bytes, checked on hand-worked examples."""

import subprocess
import sys

import pytest

from hsplit_sim.scenario import DeviceSpec
from hsplit_sim.sim.timemodel import compute_seconds, flops_within, transfer_seconds


def test_seconds_hand_worked():
    device = DeviceSpec(tflops=10.0, efficiency=0.5, memory_gb=1)
    # 2 TFLOP on a 10 TFLOP/s device at 50 %: 0.4 s; and 0.4 s there holds 2 TFLOP.
    assert compute_seconds(2e12, device) == pytest.approx(0.4)
    assert flops_within(0.4, device) == pytest.approx(2e12)
    # 1 MB over 8 Mbit/s with 20 ms latency: 0.02 + 8e6 / 8e6 = 1.02 s.
    assert transfer_seconds(1_000_000, 8.0, 20.0) == pytest.approx(1.02)


def test_sim_does_not_import_torch():
    code = "import sys, hsplit_sim.sim; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
