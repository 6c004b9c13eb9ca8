"""Adding an algorithm takes one module: the class below is a whole algorithm (a FedLoRA that weighs every
client equally, whatever its data), with its config, its aggregation rule and its costs. Registered, it runs
from a scenario, timing-only and trained, and its config joins the schema."""

from typing import Literal

import numpy as np
import pandas as pd
import pytest

from hsplit_sim import costs
from hsplit_sim.algorithms import ALGORITHMS, register
from hsplit_sim.algorithms.aggregation import adapter_update, fedavg
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import scenario_from_dict
from hsplit_sim.scenario.schema import AlgorithmConfig


class EqualFedLoRA(FederatedProtocol):
    """FedLoRA with every client's adapter weighted equally."""

    name = "equal-fedlora"

    class Config(AlgorithmConfig):
        name: Literal["equal-fedlora"]
        rounds_between_checks: int = 1  # a field of its own, to show where algorithm-specific settings go

    @classmethod
    def candidate_ranks(cls, scenario) -> list[int]:
        return [scenario.algorithm.rank]

    def planned(self, clients) -> Planned:
        ranks = self.rank_layout(self.config.rank)
        flops = 2 * costs.adapter_params(self.ctx.spec, ranks) * len(clients)
        nbytes = costs.adapter_bytes(self.ctx.spec, ranks)
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": {c.index: nbytes for c in self.active_clients()}})

    def aggregate(self, contributions) -> Outcome:
        adapters = [contributions.client_side[k] for k in contributions.clients]
        equal = np.full(len(adapters), 1 / len(adapters))
        merged = fedavg(adapters, equal)
        return Outcome(used=adapter_update(merged, self.config.scaling), exact=self.exact(contributions),
                       measured={"FLOPs": 2 * sum(t.size for t in merged.values()) * len(adapters),
                                 "broadcast bytes": {k: sum(t.nbytes for t in merged.values())
                                                     for k in contributions.active}},
                       client_adapters={k: merged for k in contributions.active}, server_adapters={"global": merged})


@pytest.fixture(scope="module")
def registered():
    register(EqualFedLoRA)
    yield
    del ALGORITHMS[EqualFedLoRA.name]


SCENARIO = {
    "name": "toy", "seed": 0, "model": {"name": "tiny-gpt2"},
    "data": {"name": "e2e-synthetic", "max_length": 32, "train_examples": 32, "eval_examples": 8},
    "algorithm": {"name": "equal-fedlora", "rank": 4, "rounds_between_checks": 2},
    "training": {"rounds": 2, "local_steps": 2, "batch_size": 2},
    "server": {"device": "rtx-3090"},
    "clients": [{"count": 3, "device": "jetson-agx-orin", "link": "wifi-6"}],
}


@pytest.mark.parametrize("timing_only", [True, False])
def test_a_new_algorithm_runs_from_one_module(registered, tmp_path, timing_only):
    scenario = scenario_from_dict(SCENARIO, [f"output.dir={tmp_path}", f"runtime.timing_only={timing_only}"])
    assert scenario.algorithm.rounds_between_checks == 2
    rounds = pd.read_parquet(run_scenario(scenario, progress=False) / "rounds.parquet")
    assert list(rounds["round"]) == [0, 1, 2] and (rounds["sim_time_s"].diff().dropna() > 0).all()
    assert rounds["eval_ppl"].notna().all() != timing_only


def test_its_settings_belong_to_it_alone(registered):
    with pytest.raises(ScenarioError, match="algorithm.rounds_between_checks: unknown key"):
        scenario_from_dict(SCENARIO, ["algorithm.name=fedlora"])
