"""A worker's training role, called directly: what happens to an adapter's optimizer when aggregation hands the
adapter new values."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from hsplit_sim.experiment.run import worker_init_args
from hsplit_sim.scenario import load_scenario
from hsplit_sim.training.roles import make_role

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "tiny.yaml"


def trained_role():
    scenario = load_scenario(TINY, ["model.name=tiny-llama", "data.train_examples=16"])
    role = make_role(worker_init_args(scenario, "server", 2))
    role.configure(None, {"adapter": "a", "scaling": 2.0, "ranks": [[0, "self_attn.q_proj", 4]], "lr": 1e-2}, {})
    role.full_step(None, {"adapter": "a"}, {"batch": np.arange(2)})
    return role


def adam_state(role) -> list[torch.Tensor]:
    optimizer = role.optimizers["a"]
    return [optimizer.state[p]["exp_avg"].clone() for group in optimizer.param_groups for p in group["params"]]


def test_new_values_keep_the_optimizer_state_unless_told_to_restart():
    role = trained_role()
    before = adam_state(role)
    assert before and any(m.abs().sum() > 0 for m in before)  # B moved (A has no gradient while B is 0)
    values = role.get_adapter(None, {"adapter": "a"}, {})[1]
    averaged = {key: value * 0.5 for key, value in values.items()}
    role.set_adapter(None, {"adapter": "a"}, averaged)
    assert all(torch.equal(a, b) for a, b in zip(before, adam_state(role)))  # SplitLoRA's code keeps it
    got = role.get_adapter(None, {"adapter": "a"}, {})[1]
    assert all(np.allclose(got[key], averaged[key]) for key in averaged)
    role.set_adapter(None, {"adapter": "a", "restart_optimizer": True}, averaged)
    assert not role.optimizers["a"].state  # a new local optimisation
