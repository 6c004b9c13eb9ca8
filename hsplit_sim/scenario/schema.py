"""The scenario file's schema: pydantic models that reject unknown keys, so typos never pass silently."""

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from hsplit_sim.scenario.catalog import DeviceSpec, LinkSpec, resolve_device, resolve_link

# Algorithms the scenario may name; the algorithms package keeps this in step with its registry.
KNOWN_ALGORITHMS = ("hsplitlora", "splitlora", "cenlora", "ft", "fedlora", "hetlora", "flora", "flexlora")

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    """A built-in model by name, or a local Hugging Face checkpoint directory by path."""

    name: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelRef":
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of name and path")
        return self


class IidPartition(_Strict):
    kind: Literal["iid"] = "iid"


class DirichletPartition(_Strict):
    """Non-IID: each client's share of every value of one MR attribute follows Dirichlet(alpha)."""

    kind: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0)
    by: Literal[E2E_ATTRIBUTES] = "eatType"


Partition = Annotated[Union[IidPartition, DirichletPartition], Field(discriminator="kind")]


class DataSpec(_Strict):
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


class AlgorithmSpec(_Strict):
    name: str
    rank: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    targets: list[Literal[TARGETS]] = Field(default_factory=lambda: ["q", "v"], min_length=1)
    split_layer: int = Field(1, ge=1, description="number of blocks on the client side")
    rank_set: list[int] = Field(
        default_factory=lambda: [0, 4, 8, 16], min_length=1,
        description="ranks Q that HSplitLoRA and the heterogeneous federated baselines choose from (0: no adapter)",
    )
    contributors: Literal["renormalised", "global"] = Field(
        "renormalised", description="aggregation weights p_k: over the clients that trained a weight, or over all"
    )
    heterogeneity: Literal["weakest", "drop"] = Field(
        "weakest", description="SplitLoRA with unequal budgets: one configuration that fits the weakest client, "
        "or the scenario's configuration with clients that cannot hold it dropped",
    )
    server_adapters: Literal["shared", "per_client"] | None = Field(
        None, description="split algorithms' server side: one adapter the clients train in turn, in the order their "
        "server steps happen (shared; SplitLoRA's code), or one per client, aggregated every round like the client "
        "side (per_client); none: the algorithm's default (SplitLoRA shared, HSplitLoRA per_client)",
    )
    importance: Literal["abs_sum", "sum_abs"] = Field(
        "abs_sum", description="IWI's gradient-weight product: |sum w*g| or sum |w*g|"
    )
    resplit_threshold: float = Field(0.1, ge=0, description="HSplitLoRA re-splits when the client side's share "
                                     "of importance moves by more than this")
    time_budget_s: float | None = Field(
        None, gt=0, description="HSplitLoRA: longest client compute per local iteration (forward and backward of "
        "its segment on its device), seconds; none: memory alone bounds a client's plan")
    iwi: bool = Field(True, description="HSplitLoRA ablation switch: important weight identification")
    armsc: bool = Field(True, description="HSplitLoRA ablation switch: adaptive rank and split configuration")
    naa: bool = Field(True, description="HSplitLoRA ablation switch: noise-free adapter aggregation")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in KNOWN_ALGORITHMS:
            raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(KNOWN_ALGORITHMS)}")
        return name

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


class TrainingSpec(_Strict):
    rounds: int = Field(3, gt=0)
    local_steps: int = Field(4, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(2.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate every this many rounds")


class ServerSpec(_Strict):
    device: DeviceRef
    accelerators: int = Field(1, ge=1)


class ClientGroup(_Strict):
    """`count` identical clients: same device, same link."""

    count: int = Field(1, gt=0)
    device: DeviceRef
    link: LinkRef
    memory_budget_gb: float | None = Field(None, gt=0, description="defaults to the device's memory_gb")


class RuntimeSpec(_Strict):
    client_workers: int = Field(1, gt=0)
    torch_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    request_timeout_s: float = Field(600.0, gt=0)
    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    timing_only: bool = Field(False, description="simulate time only, with costs and bytes from the cost model: "
                              "no workers, no torch, no training (accuracy columns are NaN)")
    replay_from: str | None = Field(None, description="a run directory whose training to replay: the run is "
                                    "timing-only and takes its accuracy columns (and HSplitLoRA's plans) from there; "
                                    "its training key must match")
    replay_fallback: Literal["error", "train"] = Field(
        "error", description="when the replayed run's server order differs (SplitLoRA's shared server adapter): "
        "stop with an error, or train anew")


class OutputSpec(_Strict):
    dir: str = "runs"


class Scenario(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="names the run directory")
    seed: int = Field(0, ge=0)
    model: ModelRef
    data: DataSpec
    algorithm: AlgorithmSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    server: ServerSpec
    clients: list[ClientGroup] = Field(min_length=1)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


@dataclass(frozen=True)
class ClientSpec:
    """One simulated client, with its group's device and link resolved to full specs."""

    index: int
    group: int
    device: DeviceSpec
    link: LinkSpec
    memory_budget_gb: float
