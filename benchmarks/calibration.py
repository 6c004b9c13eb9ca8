"""The time model against this machine: predicted and measured step times of real segments.

Times client forward, client backward with its AdamW step, and server step (forward, loss, backward, AdamW) of
tiny-gpt2, tiny-llama and SmolLM2-135M segments at a shallow, a middle and a deep split, as `hsplit-sim
calibrate` does; fits this host's entry (measured peak and bandwidth, fitted efficiency and launch overhead)
and prints every step's predicted against measured time. Twice: fitted to every step, and fitted to the tiny
models alone with SmolLM2 predicted from that entry (a held-out check). Goal: every step within 10 %.

    python benchmarks/calibration.py [--repeats 5] [--models tiny-gpt2,tiny-llama,smollm2-135m]
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from hsplit_sim.sim.calibration import fit_host, relative_errors, step_work
from hsplit_sim.scenario import DeviceSpec
from hsplit_sim.training import calibration

TINY = ("tiny-gpt2", "tiny-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny-gpt2,tiny-llama,smollm2-135m")
    args = parser.parse_args()

    tflops, bandwidth = calibration.matmul_tflops(), calibration.memory_bandwidth_gbps()
    print(f"host: {calibration.torch_threads()} torch threads, peak {tflops:.4f} TFLOPS (2048^3 fp32 matmul), "
          f"bandwidth {bandwidth:.1f} GB/s (a + b over 128 MiB arrays)")
    shapes = calibration.default_shapes(args.models.split(","))
    measured = calibration.measure_shapes(shapes, args.repeats)
    works = [step_work(m.shape.model, m.kind, m.shape.split, m.shape.batch, m.shape.seq) for m in measured]
    seconds = np.array([m.seconds for m in measured])

    def entry(which: list[int]) -> DeviceSpec:
        efficiency, overhead = fit_host([works[i] for i in which], seconds[which].tolist(), tflops, bandwidth)
        return DeviceSpec(tflops=tflops, efficiency=efficiency, memory_gb=1, memory_bandwidth_gbps=bandwidth,
                          launch_overhead_us=overhead)

    everything = list(range(len(measured)))
    tiny = [i for i in everything if measured[i].shape.model in TINY]
    fits = {"fitted to every step": entry(everything)}
    if len(tiny) < len(everything):
        fits["fitted to the tiny models only"] = entry(tiny)
    columns = {name: relative_errors(device, works, seconds.tolist()) for name, device in fits.items()}

    print(f"\n{'model':13s} {'split':>5s} {'tokens':>7s} {'step':11s} {'kernels':>7s} {'GFLOP':>8s} "
          f"{'measured ms':>11s}  " + "  ".join(f"{'predicted':>9s} {'error':>6s}" for _ in fits))
    for i, m in enumerate(measured):
        cells = "  ".join(f"{m.seconds * (1 + columns[name][i]) * 1e3:9.3f} {columns[name][i]:+6.1%}"
                          for name in fits)
        print(f"{m.shape.model:13s} {m.shape.split:5d} {m.shape.batch}x{m.shape.seq:<5d} {m.kind:11s} "
              f"{works[i].kernels:7d} {works[i].flops / 1e9:8.3f} {m.seconds * 1e3:11.3f}  {cells}")
    print()
    for name, device in fits.items():
        errors = np.abs(columns[name])
        held_out = [i for i in everything if i not in tiny]
        line = (f"{name}: efficiency {device.efficiency:.4f}, launch overhead {device.launch_overhead_us:.2f} us; "
                f"|error| median {np.median(errors):.1%}, worst {errors.max():.1%}, "
                f"within 10 %: {int((errors <= 0.10).sum())} of {len(errors)}")
        if name != "fitted to every step" and held_out:
            line += f"; SmolLM2 (held out) worst {errors[held_out].max():.1%}"
        print(line)


if __name__ == "__main__":
    main()
