"""The scenario file's schema: pydantic models that reject unknown keys, so typos never pass silently."""

import functools
import re
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    TypeAdapter,
    create_model,
    field_validator,
    model_validator,
)

from hsplit_sim.scenario.catalog import (
    MIN_MBPS,
    DeviceSpec,
    LinkSpec,
    resolve_device,
    resolve_link,
)
from hsplit_sim.scenario.strict import StrictModel

# Number formats the simulated devices compute and communicate in (host training stays fp32).
Precision = Literal["fp32", "fp16", "bf16"]
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# Logical LoRA targets; each model family maps them onto its own module names.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Meaning-representation attributes of E2E, the keys a non-IID partition can skew by.
E2E_ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")


def _ref_kind(value: object) -> str:
    """Pick the branch of a device or link reference, so errors come from one branch only."""
    return "builtin" if isinstance(value, str) else "inline"


def _builtin_device(name: str) -> str:
    resolve_device(name)
    return name


def _builtin_link(name: str) -> str:
    resolve_link(name)
    return name


DeviceRef = Annotated[
    Union[
        Annotated[str, AfterValidator(_builtin_device), Tag("builtin")],
        Annotated[DeviceSpec, Tag("inline")],
    ],
    Discriminator(_ref_kind),
    Field(description="a built-in device name (see `hsplit-sim devices`) or an inline device"),
]

LinkRef = Annotated[
    Union[
        Annotated[str, AfterValidator(_builtin_link), Tag("builtin")],
        Annotated[LinkSpec, Tag("inline")],
    ],
    Discriminator(_ref_kind),
    Field(description="a built-in link name (see `hsplit-sim devices`) or an inline link"),
]


class ModelRef(StrictModel):
    """A built-in model by name, or a local Hugging Face checkpoint directory by path."""

    name: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelRef":
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of name and path")
        return self


class IidPartition(StrictModel):
    kind: Literal["iid"] = "iid"


class DirichletPartition(StrictModel):
    """Non-IID: each client's share of every value of one MR attribute follows Dirichlet(alpha)."""

    kind: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0)
    by: Literal[E2E_ATTRIBUTES] = "eatType"


Partition = Annotated[Union[IidPartition, DirichletPartition], Field(discriminator="kind")]


class DataSpec(StrictModel):
    name: Literal["e2e-synthetic", "e2e"]
    dir: str | None = Field(None, description="E2E CSV directory (devset.csv, testset_w_refs.csv, optionally "
                            "trainset.csv; plain or .gz); defaults to $HSPLIT_SIM_E2E_DIR, else the development and "
                            "test splits shipped with the package")
    max_length: int = Field(64, gt=0)
    train_examples: int | None = Field(None, gt=0, description="cap on training examples; none means all")
    eval_examples: int | None = Field(None, gt=0, description="cap on evaluation examples; none means all")
    partition: Partition = Field(default_factory=IidPartition)
    test_examples: int = Field(0, ge=0, description="test MRs decoded greedily after the last round and scored "
                               "(BLEU, NIST, METEOR, ROUGE-L, CIDEr); 0: none")
    max_new_tokens: int = Field(48, gt=0, description="longest generated reference")


class AlgorithmConfig(StrictModel):
    """What every algorithm of a comparison is configured with (each reads the part it needs). An algorithm's
    module adds its own fields in a subclass (hsplit_sim/algorithms/<name>.py: Config), and a scenario's
    algorithm section is validated against the class of its `name`: a key of another algorithm is an error."""

    name: str
    rank: int = Field(8, gt=0, description="LoRA rank of the algorithms with one rank")
    alpha: int = Field(16, gt=0, description="LoRA alpha at algorithm.rank: every adapter, whatever its rank, "
                       "updates with scaling alpha / rank (alpha proportional to rank)")
    targets: list[Literal[TARGETS]] = Field(default_factory=lambda: ["q", "v"], min_length=1)
    split_layer: int = Field(1, ge=1, description="number of blocks on the client side (split algorithms)")
    rank_set: list[int] = Field(
        default_factory=lambda: [0, 4, 8, 16], min_length=1,
        description="ranks Q that HSplitLoRA and the heterogeneous federated baselines choose from (0: no adapter)",
    )
    contributors: Literal["renormalised", "global"] = Field(
        "renormalised", description="aggregation weights p_k: over the clients that trained a weight, or over all"
    )

    @property
    def scaling(self) -> float:
        """s in s * B @ A for every adapter of every method: one rule for all ranks, so an adapter's rank sets
        its capacity, not its step size."""
        return self.alpha / self.rank

    @field_validator("rank_set")
    @classmethod
    def _ranks(cls, ranks: list[int]) -> list[int]:
        if any(r < 0 for r in ranks) or not any(r > 0 for r in ranks):
            raise ValueError(f"rank_set needs non-negative ranks and at least one positive: {ranks}")
        return sorted(set(ranks))

    @field_validator("targets")
    @classmethod
    def _unique(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets repeat a name: {targets}")
        return targets


def algorithm_config(data: dict) -> AlgorithmConfig:
    """The algorithm section validated against the config class its name registers (hsplit_sim.algorithms)."""
    from hsplit_sim.algorithms import (
        ALGORITHMS,  # the registry imports this module: looked up when validating
    )

    name = data.get("name")
    if not isinstance(name, str) or name not in ALGORITHMS:
        _algorithm_names(tuple(sorted(ALGORITHMS))).model_validate(data)  # fails at algorithm.name, naming them
    return ALGORITHMS[name].Config.model_validate(data)


def scenario_json_schema() -> dict:
    """JSON Schema of scenario files, with the algorithm section as the union of every registered config."""
    from hsplit_sim.algorithms import ALGORITHMS

    configs = tuple(ALGORITHMS[name].Config for name in sorted(ALGORITHMS))
    union = TypeAdapter(Annotated[Union[configs], Field(discriminator="name")]).json_schema()
    schema = Scenario.model_json_schema()
    schema["$defs"].update(union.pop("$defs", {}))
    schema["properties"]["algorithm"] = union
    return schema


@functools.cache
def _algorithm_names(names: tuple[str, ...]) -> type[BaseModel]:
    return create_model("AlgorithmName", __config__=ConfigDict(extra="allow"), name=(Literal[names], ...))


class TrainingSpec(StrictModel):
    rounds: int = Field(3, gt=0, description="rounds after the initial evaluation; a trained run may take at most "
                        "10,000,000 client-rounds (rounds x clients), a cap against mistyped values")
    local_steps: int = Field(4, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate every this many rounds")


class ServerSpec(StrictModel):
    device: DeviceRef
    accelerators: int = Field(1, ge=1, le=4096, description="identical devices (at most 4,096: a cap, so that a "
                              "mistyped count cannot exhaust memory)")
    precision: Precision | None = Field(None, description="the server's number format; none: the scenario's")


class CentralisedSpec(StrictModel):
    """Where the centralised baselines (FT, CenLoRA) train on the pooled data; other algorithms ignore it."""

    device: DeviceRef | None = Field(None, description="a catalog name or an inline device that trains alone (in "
                                     "the server's precision, receiving every client's data); none: one of the "
                                     "server's accelerators")


class ClientGroup(StrictModel):
    """`count` identical clients: same device, same link."""

    count: int = Field(1, gt=0, le=1_000_000, description="at most a million a group")
    device: DeviceRef
    link: LinkRef
    memory_budget_gb: float | None = Field(None, gt=0, description="defaults to the device's memory_gb")
    medium: str | None = Field(None, description="a shared wireless medium of system.media these clients' links "
                               "go through (their transfers share its capacity); none: links of their own")
    precision: Precision | None = Field(None, description="these clients' number format, for a device that lacks "
                                        "the scenario's; none: the scenario's")


class Availability(StrictModel):
    """When clients are online: a trace of online windows, or alternating online and offline periods of
    exponentially distributed length (seeded). A client offline at a round's start sits the round out; one
    offline when its work would finish loses that work."""

    trace: str | None = Field(None, description="CSV with columns client, start_s, end_s: the windows in which a "
                              "client is online; a client without rows is always online (relative paths: to the "
                              "scenario file)")
    mean_online_s: float | None = Field(None, gt=0)
    mean_offline_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_model(self) -> "Availability":
        parametric = (self.mean_online_s is not None, self.mean_offline_s is not None)
        if (self.trace is not None) == any(parametric) or any(parametric) != all(parametric):
            raise ValueError("give either trace, or both mean_online_s and mean_offline_s")
        return self


class Selection(StrictModel):
    """Who trains in a round: FedScale's over-commitment picks clients_per_round x (1 + over_commit) of the
    online clients at random, and the round takes the first clients_per_round updates to arrive."""

    clients_per_round: int = Field(gt=0)
    over_commit: float = Field(0.0, ge=0)


class Jitter(StrictModel):
    """Seeded lognormal factors (median 1) per client and round on compute durations and on link rates."""

    compute_sigma: float = Field(0.0, ge=0)
    bandwidth_sigma: float = Field(0.0, ge=0)


class Medium(StrictModel):
    """A shared wireless medium (one access point): the transfers of every client behind it share its capacity
    (processor sharing), each also capped by its own link's rate."""

    name: str
    up_mbps: float = Field(ge=MIN_MBPS)
    down_mbps: float = Field(ge=MIN_MBPS)


class SystemSpec(StrictModel):
    """Behaviour of the fleet beyond each device's speed and link: who is online, who drops, deadlines,
    shared media, variability. Everything off by default."""

    availability: Availability | None = None
    dropout: float = Field(0.0, ge=0, lt=1, description="per client and round, the probability that a client leaves "
                           "after a uniformly drawn share of its local steps; its update is lost")
    deadline_s: float | None = Field(None, gt=0, description="a round's clients must have uploaded their adapters "
                                     "this many seconds after the round starts; those still working then are "
                                     "stopped and their updates lost (participation outcome: late)")
    selection: Selection | None = None
    jitter: Jitter | None = None
    bandwidth_trace: str | None = Field(None, description="CSV with columns client, time_s, up_mbps, down_mbps: each "
                                        "client's link rates from time_s on (relative paths: to the scenario file)")
    media: list[Medium] = Field(default_factory=list)


REMOTE_WORKER = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):(\d{1,5})")


def _remote_worker(endpoint: str) -> str:
    """tcp://HOST:PORT with a port a worker can listen on: a worker on another machine is reached over tcp."""
    match = REMOTE_WORKER.fullmatch(endpoint)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT (a worker started by hand is reached over tcp, at the "
                         "port its --listen names)")
    return endpoint


class RuntimeSpec(StrictModel):
    client_workers: int = Field(1, gt=0, le=256, description="client worker processes (at most 256); with "
                                "remote_workers, their number")
    remote_workers: list[Annotated[str, AfterValidator(_remote_worker)]] = Field(
        default_factory=list, max_length=256,
        description="tcp://HOST:PORT of client workers started by hand (hsplit-sim worker --listen ADDR --key FILE), "
        "in place of the client workers the run would start; the server worker stays local. Needs key_file (a copy "
        "of the workers' --key) and transport tcp on a host they reach")
    placement: Literal["local", "ray"] = Field(
        "local", description="where the run starts its workers: local processes, or Ray actors, each starting its "
        "worker process on its node, on the cluster RAY_ADDRESS names, else a local Ray instance (pip install "
        "'hsplit-sim[ray]'). Ray needs transport tcp, and a host the nodes reach unless they are all this machine")
    ray_server_gpus: int = Field(0, ge=0, le=8, description="GPUs the server worker's Ray actor asks for "
                                 "(placement ray): 1 puts the server on a GPU node")
    torch_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    request_timeout_s: float = Field(600.0, gt=0)
    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = Field("127.0.0.1", description="the interface tcp sockets bind: loopback unless key_file is set too")
    key_file: str | None = Field(None, description="a CurveZMQ secret certificate (hsplit-sim keygen FILE; mode "
                                 "0600) that becomes the coordinator's key; needed for a tcp host other than "
                                 "loopback (relative paths: to the scenario file). Without it each run makes its "
                                 "own keys")
    timing_only: bool = Field(False, description="simulate time only, with costs and bytes from the cost model: "
                              "no workers, no torch, no training (accuracy columns are NaN)")
    replay_from: str | None = Field(None, description="a run directory whose training to replay: the run is "
                                    "timing-only and takes its accuracy columns (and HSplitLoRA's plans) from there; "
                                    "its training key must match")
    replay_fallback: Literal["error", "train"] = Field(
        "error", description="when the replayed run's server order differs (SplitLoRA's shared server adapter): "
        "stop with an error, or train anew")

    @model_validator(mode="after")
    def _remote_workers_are_the_client_workers(self):
        if self.remote_workers and "client_workers" not in self.model_fields_set:
            self.client_workers = len(self.remote_workers)
        return self


class OutputSpec(StrictModel):
    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=0, description="rounds between the checkpoints `run --resume` continues "
                                  "from (0: none). Each holds what trains: for full fine-tuning the whole model "
                                  "and both Adam moments (SmolLM2-135M: about 1.6 GB)")


class Scenario(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="names the run directory")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds every random draw (numpy's range: below 2^32)")
    precision: Precision = Field("fp32", description="the number format of the simulated training: it sets each "
                                 "device's peak rate and the bytes of weights, activations and what crosses links "
                                 "(mixed precision: trainable weights keep fp32 optimizer state); the host trains "
                                 "in fp32 whatever it is")
    model: ModelRef
    data: DataSpec
    algorithm: SerializeAsAny[AlgorithmConfig]
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    server: ServerSpec
    centralised: CentralisedSpec = Field(default_factory=CentralisedSpec)
    clients: list[ClientGroup] = Field(min_length=1)
    system: SystemSpec = Field(default_factory=SystemSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("algorithm", mode="wrap")
    @classmethod
    def _by_name(cls, value, handler):
        return algorithm_config(value) if isinstance(value, dict) else handler(value)


@dataclass(frozen=True)
class ClientSpec:
    """One simulated client, with its group's device and link resolved to full specs."""

    index: int
    group: int
    device: DeviceSpec
    link: LinkSpec
    memory_budget_gb: float
    medium: str | None = None
    precision: str = "fp32"

    @property
    def element_bytes(self) -> int:
        """Bytes of one floating-point value in this client's format."""
        return ELEMENT_BYTES[self.precision]
