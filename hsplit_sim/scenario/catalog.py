"""Built-in devices and network links, each with the datasheet figure it rests on and what is assumed.

The time model (sim/timemodel.py) charges a device per operation: a matmul at its peak rate in the simulated
number format times efficiency (the fraction of peak that LoRA fine-tuning matmuls are assumed to reach on that class
of hardware) or at its memory bandwidth, whichever is slower; memory-bound operations at the bandwidth; and every kernel
a launch overhead (the per-operation cost of eager PyTorch on that class of host processor).
"""

from pydantic import ConfigDict, Field

from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.strict import StrictModel


class PowerSpec(StrictModel):
    """A device's power draw in each state, watts: training, sending, receiving, and waiting."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)

    compute: float = Field(gt=0)
    transmit: float = Field(gt=0)
    receive: float = Field(gt=0)
    idle: float = Field(gt=0)


# Floors and caps where a value, though positive and finite, would give durations of no meaning (a link at
# 1e-300 Mbit/s takes 1e306 s): a rate below LoRaWAN's slowest (0.3 kbit/s) or a device slower than a
# microcontroller is an input error, not a scenario.
MIN_MBPS = 1e-4  # 100 bit/s
MAX_LATENCY_MS = 1e5  # 100 s one way
MIN_TFLOPS = 1e-6  # 1 MFLOP/s
MIN_MEMORY_GBPS = 1e-6  # 1 kB/s
MIN_EFFICIENCY = 1e-3  # the lower end of hsplit-sim calibrate's search


class DeviceSpec(StrictModel):
    """A compute device; scenarios may give one inline instead of naming a built-in one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)

    name: str = "custom"
    tflops: float = Field(ge=MIN_TFLOPS, description="peak FP32 TFLOPS")
    tflops_fp16: float | None = Field(None, ge=MIN_TFLOPS, description="peak FP16 TFLOPS (tensor cores where the "
                                      "device has them, FP32 accumulation); none: no FP16 arithmetic")
    tflops_bf16: float | None = Field(None, ge=MIN_TFLOPS, description="peak BF16 TFLOPS; none: no BF16 arithmetic")
    memory_bandwidth_gbps: float | None = Field(None, ge=MIN_MEMORY_GBPS, description="peak memory bandwidth, GB/s")
    efficiency: float = Field(ge=MIN_EFFICIENCY, le=1, description="fraction of peak reached by LoRA fine-tuning "
                              "matmuls")
    launch_overhead_us: float | None = Field(None, ge=0, description="microseconds each kernel (one eager PyTorch "
                                             "operation) adds; none: not charged")
    memory_gb: float = Field(gt=0)
    power_w: PowerSpec | None = Field(None, description="power per state, for the energy table; none: no energy")
    source: str = "given in the scenario"

    def peak_tflops(self, precision: str) -> float | None:
        """The peak rate in a number format (fp32, fp16, bf16); None where the device lacks it."""
        return {"fp32": self.tflops, "fp16": self.tflops_fp16, "bf16": self.tflops_bf16}[precision]


class LinkSpec(StrictModel):
    """A client's network link to the server, as effective throughput and one-way latency."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)

    name: str = "custom"
    up_mbps: float = Field(ge=MIN_MBPS)
    down_mbps: float = Field(ge=MIN_MBPS)
    latency_ms: float = Field(ge=0, le=MAX_LATENCY_MS)
    source: str = "given in the scenario"


_EMBEDDED = ("efficiency 0.3 assumed for embedded GPUs; 20 us per kernel assumed for eager PyTorch "
             "dispatch and launch from ARM cores")
_DISCRETE = ("efficiency 0.4 assumed for discrete GPUs; 8 us per kernel assumed for eager PyTorch dispatch and "
             "launch from an x86 host")

DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in [
        DeviceSpec(
            name="jetson-agx-xavier",
            tflops=1.41,
            tflops_fp16=11.0, memory_bandwidth_gbps=136.5,
            efficiency=0.3,
            launch_overhead_us=20.0,
            memory_gb=32,
            power_w=PowerSpec(compute=30, transmit=8, receive=7, idle=5),
            source="NVIDIA Jetson AGX Xavier datasheet: 512-core Volta GPU at 1.377 GHz "
            f"(512 x 2 FLOP x 1.377 GHz = 1.41 TFLOPS FP32), 32 GB LPDDR4x shared; {_EMBEDDED}"
            "; power: 30 W training (the datasheet's largest power mode, MAXN), 5 W idle and 3 W / 2 W more for a "
            "Wi-Fi radio sending / receiving, all three assumed"
            "; FP16 11 TFLOPS (64 tensor cores) and 136.5 GB/s (256-bit LPDDR4x at 2133 MHz) from the same "
            "datasheet; Volta has no BF16",
        ),
        DeviceSpec(
            name="jetson-agx-orin",
            tflops=5.3,
            tflops_fp16=42.5, tflops_bf16=42.5, memory_bandwidth_gbps=204.8,
            efficiency=0.3,
            launch_overhead_us=20.0,
            memory_gb=64,
            power_w=PowerSpec(compute=60, transmit=11, receive=10, idle=8),
            source="NVIDIA Jetson AGX Orin 64GB datasheet: 2048-core Ampere GPU at 1.3 GHz "
            f"(about 5.3 TFLOPS FP32), 64 GB LPDDR5 shared; {_EMBEDDED}"
            "; power: 60 W training (the datasheet's largest power mode, MAXN), 8 W idle and 3 W / 2 W more for a "
            "Wi-Fi radio sending / receiving, all three assumed"
            "; 204.8 GB/s from the datasheet; FP16/BF16 dense 42.5 TFLOPS assumed from the datasheet's 170 sparse "
            "INT8 TOPS of the GPU (Ampere: sparse 2x dense, INT8 2x FP16)",
        ),
        DeviceSpec(
            name="jetson-orin-nano",
            tflops=1.28,
            tflops_fp16=10.0, tflops_bf16=10.0, memory_bandwidth_gbps=68.0,
            efficiency=0.3,
            launch_overhead_us=20.0,
            memory_gb=8,
            power_w=PowerSpec(compute=15, transmit=6, receive=5, idle=3),
            source="NVIDIA Jetson Orin Nano 8GB datasheet: 1024-core Ampere GPU at 625 MHz "
            f"(1.28 TFLOPS FP32), 8 GB LPDDR5 shared; {_EMBEDDED}"
            "; power: 15 W training (the datasheet's largest power mode), 3 W idle and 3 W / 2 W more for a Wi-Fi "
            "radio sending / receiving, all three assumed"
            "; 68 GB/s from the datasheet; FP16/BF16 dense 10 TFLOPS assumed from its 40 sparse INT8 TOPS (as for "
            "the AGX Orin)",
        ),
        DeviceSpec(
            name="raspberry-pi-5",
            tflops=0.154,
            tflops_fp16=0.307, memory_bandwidth_gbps=17.1,
            efficiency=0.3,
            launch_overhead_us=10.0,
            memory_gb=8,
            power_w=PowerSpec(compute=7, transmit=4.5, receive=4, idle=2.7),
            source="Raspberry Pi 5 product brief: 4x Cortex-A76 at 2.4 GHz; peak FP32 assumed from two "
            "128-bit NEON FMA pipes per core (4 x 16 FLOP x 2.4 GHz = 0.154 TFLOPS), 8 GB model; "
            "efficiency 0.3 assumed for CPUs; 10 us per operation assumed for eager PyTorch dispatch on the CPU "
            "itself (no kernel launch)"
            "; power: about 2.7 W idle and about 7 W with all four cores loaded, the figures published "
            "measurements of the Pi 5 report (rounded; not a datasheet value), and 1.8 W / 1.3 W more for its radio "
            "sending / receiving, assumed"
            "; FP16 twice FP32 assumed from the A76's half-precision NEON (ARMv8.2 FP16), no BF16 (ARMv8.6); 17.1 "
            "GB/s from 32-bit LPDDR4X-4267",
        ),
        DeviceSpec(
            name="flagship-phone",
            tflops=4.6,
            tflops_fp16=9.2, memory_bandwidth_gbps=76.8,
            efficiency=0.2,
            launch_overhead_us=20.0,
            memory_gb=12,
            power_w=PowerSpec(compute=8, transmit=3.5, receive=2.5, idle=1),
            source="Snapdragon 8 Gen 3 class phone (Adreno 750 GPU): Qualcomm publishes no FP32 figure; "
            "about 4.6 TFLOPS FP32 is a third-party estimate (published estimates vary), 12 GB LPDDR5X; "
            "efficiency 0.2 assumed for phone GPUs under thermal limits, 20 us per kernel assumed as for ARM hosts"
            "; power: 8 W under a sustained GPU load, 1 W idle with the screen off, and 2.5 W / 1.5 W more for "
            "its radio sending / receiving, all assumed as typical of this class (no vendor figure)"
            "; FP16 twice FP32 assumed (Adreno's double-rate half precision), no BF16 assumed; 76.8 GB/s from "
            "64-bit LPDDR5X-9600",
        ),
        DeviceSpec(
            name="laptop-rtx-3050",
            tflops=7.1,
            tflops_fp16=14.2, tflops_bf16=14.2, memory_bandwidth_gbps=192.0,
            efficiency=0.4,
            launch_overhead_us=8.0,
            memory_gb=4,
            power_w=PowerSpec(compute=75, transmit=17, receive=16, idle=15),
            source="NVIDIA GeForce RTX 3050 Laptop GPU specifications: 2048 CUDA cores at up to 1.74 GHz "
            f"boost (about 7.1 TFLOPS FP32), 4 GB GDDR6; {_DISCRETE}"
            "; power: 75 W training (60 W GPU, within NVIDIA's 35-80 W range for this part, plus the rest of the "
            "laptop), 15 W idle and 2 W / 1 W more for Wi-Fi sending / receiving, all assumed"
            "; FP16/BF16 tensor rate with FP32 accumulation twice FP32 as for every GeForce Ampere part (assumed "
            "from the GA102 whitepaper's ratio); 192 GB/s (128-bit GDDR6 at 12 Gbps) assumed",
        ),
        DeviceSpec(
            name="rtx-3090",
            tflops=35.6,
            tflops_fp16=71.0, tflops_bf16=71.0, memory_bandwidth_gbps=936.0,
            efficiency=0.4,
            launch_overhead_us=8.0,
            memory_gb=24,
            source="NVIDIA GeForce RTX 3090 specifications: 10496 CUDA cores at 1.695 GHz boost "
            f"(35.6 TFLOPS FP32), 24 GB GDDR6X; {_DISCRETE}"
            "; NVIDIA Ampere GA102 whitepaper: 71 dense FP16/BF16 tensor TFLOPS with FP32 accumulation, 936 GB/s",
        ),
        DeviceSpec(
            name="a100",
            tflops=19.5,
            tflops_fp16=312.0, tflops_bf16=312.0, memory_bandwidth_gbps=2039.0,
            efficiency=0.4,
            launch_overhead_us=8.0,
            memory_gb=80,
            source="NVIDIA A100 80GB SXM datasheet: 19.5 TFLOPS FP32 (non-tensor-core), 80 GB HBM2e; "
            f"{_DISCRETE}"
            "; the same datasheet: 312 dense FP16/BF16 tensor TFLOPS, 2,039 GB/s",
        ),
        DeviceSpec(
            name="h100",
            tflops=67.0,
            tflops_fp16=989.4, tflops_bf16=989.4, memory_bandwidth_gbps=3350.0,
            efficiency=0.4,
            launch_overhead_us=8.0,
            memory_gb=80,
            source=f"NVIDIA H100 SXM datasheet: 67 TFLOPS FP32, 80 GB HBM3; {_DISCRETE}"
            "; the same datasheet: 989.4 dense FP16/BF16 tensor TFLOPS (1,979 with sparsity), 3,350 GB/s",
        ),
    ]
}

_TYPICAL = "typical measured effective throughput and latency assumed, not the standard's peak rate"

LINKS: dict[str, LinkSpec] = {
    link.name: link
    for link in [
        LinkSpec(
            name="ethernet",
            up_mbps=1000,
            down_mbps=1000,
            latency_ms=0.5,
            source="Gigabit Ethernet (IEEE 802.3ab) on one LAN segment; line rate and sub-millisecond "
            "latency assumed",
        ),
        LinkSpec(
            name="wifi-5",
            up_mbps=100,
            down_mbps=200,
            latency_ms=5,
            source=f"Wi-Fi 5 (IEEE 802.11ac), 2x2 client near the access point; {_TYPICAL}",
        ),
        LinkSpec(
            name="wifi-6",
            up_mbps=300,
            down_mbps=600,
            latency_ms=3,
            source=f"Wi-Fi 6 (IEEE 802.11ax), 2x2 client near the access point; {_TYPICAL}",
        ),
        LinkSpec(
            name="lte",
            up_mbps=10,
            down_mbps=40,
            latency_ms=40,
            source=f"4G LTE public network, median conditions; {_TYPICAL}",
        ),
        LinkSpec(
            name="5g",
            up_mbps=50,
            down_mbps=300,
            latency_ms=15,
            source=f"5G NR mid-band public network, median conditions; {_TYPICAL}",
        ),
    ]
}


def resolve_device(ref: "str | DeviceSpec") -> DeviceSpec:
    """The full spec of a built-in device name, or the inline spec itself."""
    if isinstance(ref, DeviceSpec):
        return ref
    if ref not in DEVICES:
        raise ScenarioError(f"unknown device {ref!r}; built in: {', '.join(DEVICES)}")
    return DEVICES[ref]


def resolve_link(ref: "str | LinkSpec") -> LinkSpec:
    """The full spec of a built-in link name, or the inline spec itself."""
    if isinstance(ref, LinkSpec):
        return ref
    if ref not in LINKS:
        raise ScenarioError(f"unknown link {ref!r}; built in: {', '.join(LINKS)}")
    return LINKS[ref]
