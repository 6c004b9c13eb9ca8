"""A worker's training role, called directly: what happens to an adapter's optimizer when aggregation hands the
adapter new values."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
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


def untouched(state: dict) -> bool:
    """An AdamW state no step has changed: step 0, both moments zero."""
    return state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


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
    assert all(untouched(state) for state in role.optimizers["a"].state.values())  # a new local optimisation


def test_the_tail_penalty_is_the_tail_norm_hetlora_decides_by():
    from hsplit_sim.algorithms.hetlora import tail_norm

    scenario = load_scenario(TINY, ["model.name=tiny-llama", "data.train_examples=16"])
    role = make_role(worker_init_args(scenario, "server", 2))
    penalty = {"weight": 3.0, "gamma": 0.5, "min_rank": 1}
    ranks = [[0, "self_attn.q_proj", 4], [1, "self_attn.v_proj", 3]]
    role.configure(None, {"adapter": "p", "scaling": 2.0, "ranks": ranks, "lr": 1e-2, "tail_penalty": penalty}, {})
    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=v.shape).astype(np.float32)
              for k, v in role.get_adapter(None, {"adapter": "p"}, {})[1].items()}
    role.set_adapter(None, {"adapter": "p"}, values)
    assert role.tail_penalty("p").item() == pytest.approx(3.0 * tail_norm(values, 0.5, 1), rel=1e-5)
    assert role.tail_penalty("a") is None  # an adapter configured without one
    # The penalty trains: a step with a large weight pulls the tail in; the loss reported is the model's alone.
    before = tail_norm(values, 0.5, 1)
    plain = role.full_step(None, {"adapter": "p"}, {"batch": np.arange(2)})[0]["loss"]
    role.set_adapter(None, {"adapter": "p", "restart_optimizer": True}, values)
    role.adapter_args["p"]["tail_penalty"] = {**penalty, "weight": 1e4}
    heavy = role.full_step(None, {"adapter": "p"}, {"batch": np.arange(2)})[0]["loss"]
    assert heavy == pytest.approx(plain, rel=1e-6)
    assert tail_norm(role.get_adapter(None, {"adapter": "p"}, {})[1], 0.5, 1) < before


def test_adamw_with_its_state_made_up_front_steps_as_adamw():
    """The state adamw_with_state makes is the one AdamW makes lazily: same keys, dtypes and values after steps
    in which some weights have no gradient (A while B is zero; a weight out of the forward)."""
    from hsplit_sim.training.roles import adamw_with_state

    torch.manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2)]
    made = {kind: [torch.nn.Parameter(torch.randn(shape)) for shape in shapes] for kind in ("lazy", "up front")}
    for lazy, up_front in zip(made["lazy"], made["up front"]):
        up_front.data.copy_(lazy)
    optimizers = {"lazy": torch.optim.AdamW(made["lazy"], lr=1e-2, weight_decay=0.1),
                  "up front": adamw_with_state(made["up front"], lr=1e-2, weight_decay=0.1)}
    for step in range(3):
        grads = [torch.randn(shape) if step or i == 0 else None for i, shape in enumerate(shapes)]
        for kind, params in made.items():
            for p, grad in zip(params, grads):
                p.grad = None if grad is None else grad.clone()
            optimizers[kind].step()
        assert all(torch.equal(a, b) for a, b in zip(made["lazy"], made["up front"]))
    lazy, up_front = (optimizers[kind].state_dict()["state"] for kind in ("lazy", "up front"))
    assert lazy.keys() == up_front.keys()
    for index, state in lazy.items():
        assert state.keys() == up_front[index].keys()
        for key, value in state.items():
            assert value.dtype == up_front[index][key].dtype and torch.equal(value, up_front[index][key])


def test_reshape_keeps_the_leading_ranks_and_their_moments():
    role = trained_role()  # adapter "a": rank 4 on block 0's q_proj, one AdamW step taken
    params = lambda: role.adapters["a"].state()  # noqa: E731
    values = {n: p.detach().clone() for n, p in params().items()}
    moments = {n: {k: v.clone() for k, v in role.optimizers["a"].state[p].items()} for n, p in params().items()}
    role.reshape(None, {"adapter": "a", "ranks": [[0, "self_attn.q_proj", 2]]}, {})
    state = role.optimizers["a"].state
    for n, p in params().items():
        cut = (slice(0, 2),) if "lora_A" in n else (slice(None), slice(0, 2))
        assert p.shape == values[n][cut].shape
        assert torch.equal(p.detach(), values[n][cut])
        assert torch.equal(state[p]["exp_avg"], moments[n]["exp_avg"][cut])
        assert torch.equal(state[p]["exp_avg_sq"], moments[n]["exp_avg_sq"][cut])
        assert torch.equal(state[p]["step"], moments[n]["step"])
    assert role.adapter_args["a"]["lr"] == 1e-2  # still the optimiser it was configured with
    role.full_step(None, {"adapter": "a"}, {"batch": np.arange(2)})  # and it trains
    # Growing back: the kept ranks keep their values; the new ones start fresh, and so do their moments.
    kept = {n: p.detach().clone() for n, p in params().items()}
    role.reshape(None, {"adapter": "a", "ranks": [[0, "self_attn.q_proj", 3]]}, {})
    for n, p in params().items():
        cut = (slice(0, 2),) if "lora_A" in n else (slice(None), slice(0, 2))
        assert torch.equal(p.detach()[cut], kept[n])
        if "lora_B" in n:
            assert not p.detach()[:, 2:].any()  # B starts at zero
        assert untouched(role.optimizers["a"].state[p])


def test_the_probe_before_training_trains_nothing():
    """IWI's probe before round 1 (no adapter named): every projection's score on both sides of the cut, equal
    to a training probe's with fresh adapters (B = 0 leaves every output and gradient as the base model's);
    no adapter value or optimiser state moves. (Its cost: tests/test_importance.py.)"""
    from hsplit_sim import costs
    from hsplit_sim.scenario import model_hf_config

    scenario = load_scenario(TINY, ["model.name=tiny-llama", "data.train_examples=16"])
    client, server = (make_role(worker_init_args(scenario, role, 2)) for role in ("clients", "server"))
    for role, layer in ((client, 0), (server, 1)):  # each side's adapter on its side of the cut at 1
        ranks = [[layer, module, 4] for module in ("self_attn.q_proj", "mlp.up_proj")]
        role.configure(0, {"adapter": "a", "scaling": 2.0, "ranks": ranks, "split": 1, "lr": 1e-2}, {})
    before = {role: role.get_adapter(0, {"adapter": "a"}, {})[1] for role in (client, server)}

    def iteration(adapter):
        probe = {"adapter": adapter, "split": 1, "probe": True, "measure": "abs_sum"}
        smashed = client.forward(0, probe, {"batch": np.arange(4)})[1]
        result, grad = server.server_step(0, probe, smashed)
        return {**client.backward(0, {"adapter": adapter}, grad)[0]["importance"], **result["importance"]}

    probed = iteration(None)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    assert len(probed) == len(set(costs.TARGET_MODULES[spec.family].values())) * spec.n_layers
    for role in (client, server):
        after = role.get_adapter(0, {"adapter": "a"}, {})[1]
        assert all(np.array_equal(before[role][k], after[k]) for k in after)
        assert all(untouched(state) for state in role.optimizers["a"].state.values())
    trained = iteration("a")
    assert trained.keys() == probed.keys()
    for key, value in probed.items():
        assert value == pytest.approx(trained[key], rel=1e-5, abs=1e-9), key


def tiny_role(role="server"):
    scenario = load_scenario(TINY, ["model.name=tiny-llama", "data.train_examples=16"])
    return make_role(worker_init_args(scenario, role, 2))


def configure(role, name, rank, layer=0):
    ranks = [[layer, "self_attn.q_proj", rank]]
    role.configure(None, {"adapter": name, "scaling": 2.0, "ranks": ranks, "lr": 1e-2}, {})


def test_adapters_are_what_named_peft_adapters_were():
    """Every adapter starts as PEFT makes one right after seeding (and leaves torch's random state as PEFT would),
    and its keys, values and parameter order are PEFT's for the slot it runs in."""
    from peft import get_peft_model, get_peft_model_state_dict

    from hsplit_sim.training.split import lora_config

    role, reference = tiny_role(), tiny_role()
    peft, states = None, []
    for name, rank, layer in [("a", 4, 0), ("b", 2, 1), ("c", 4, 0)]:
        configure(role, name, rank, layer)
        after = torch.get_rng_state()
        config = lora_config(reference.lm.family, {layer: {"self_attn.q_proj": rank}}, 2.0)
        torch.manual_seed(reference.seed)
        if peft is None:
            peft = get_peft_model(reference.model, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
        assert torch.equal(after, torch.get_rng_state())
        expected = get_peft_model_state_dict(peft, adapter_name=name)
        got = role.get_adapter(None, {"adapter": name}, {})[1]
        assert list(got) == list(expected) and all(np.array_equal(got[k], expected[k].numpy()) for k in got)
        states.append(got)
    assert len(role.peft.peft_config) == 2  # one slot per layout, whatever the number of adapters
    role.activate("c")
    adapter = role.adapters["c"]
    slot = role.slots.layouts[adapter.layout].slots[0][0]
    lent = [p for n, p in role.peft.named_parameters() if f".{slot}." in n]
    assert len(lent) == len(adapter.params) and all(p is q for p, q in zip(lent, adapter.params))
    assert list(get_peft_model_state_dict(role.peft, adapter_name=slot)) == adapter.keys == list(states[2])
    optimizer = role.optimizers["c"]
    assert all(p is q for p, q in zip([p for group in optimizer.param_groups for p in group["params"]], lent))


def test_adapters_of_one_layout_active_together_each_count():
    """Two adapters of one layout active at once take two slots, and both contributions count."""
    role = tiny_role()
    configure(role, "a", 4)
    configure(role, "b", 4)
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        values = {k: rng.normal(size=v.shape).astype(np.float32)
                  for k, v in role.get_adapter(None, {"adapter": name}, {})[1].items()}
        role.set_adapter(None, {"adapter": name}, values)
    state = torch.get_rng_state()
    both = role.evaluate(None, {"adapters": ["a", "b"], "batch_size": 4}, {})[0]["loss"]
    assert torch.equal(state, torch.get_rng_state())  # the second slot was made off the record
    alone = [role.evaluate(None, {"adapters": [name], "batch_size": 4}, {})[0]["loss"] for name in ("a", "b")]
    assert len(role.peft.peft_config) == 2 and both not in alone
    # a and b in one adapter of twice the rank: the same sum of B @ A
    summed = {k: np.concatenate([role.get_adapter(None, {"adapter": n}, {})[1][k] for n in ("a", "b")],
                                axis=0 if "lora_A" in k else 1) for k in role.adapters["a"].keys}
    configure(role, "ab", 8)
    role.set_adapter(None, {"adapter": "ab"}, summed)
    assert role.evaluate(None, {"adapters": ["ab"], "batch_size": 4}, {})[0]["loss"] == pytest.approx(both, rel=1e-5)


@pytest.mark.parametrize("measure", [None, "abs_sum", "sum_abs"])
def test_a_client_backward_frees_what_its_forward_kept(measure):
    """A client's forward graph (and a probe's outputs) live until its backward only: memory is bounded by the
    iterations in flight, not by the clients a worker hosts."""
    import weakref

    role = tiny_role("clients")
    role.configure(0, {"adapter": "c0", "scaling": 2.0, "ranks": [[0, "self_attn.q_proj", 4]], "split": 1,
                       "lr": 1e-2}, {})
    args = {"adapter": "c0", "probe": measure is not None, "measure": measure or "abs_sum"}
    hidden = role.forward(0, args, {"batch": np.arange(2)})[1]["hidden"].copy()
    kept = [weakref.ref(t) for t in [role.pending[0][0], *role.pending[0][1].inputs()] if t.grad_fn is not None]
    assert kept
    result = role.backward(0, {"adapter": "c0"}, {"grad": np.ones_like(hidden)})[0]
    assert bool(result["importance"]) == (measure is not None)
    assert not role.pending and all(ref() is None for ref in kept)


def test_forget_frees_the_forward_of_a_client_that_was_stopped():
    import weakref

    role = tiny_role("clients")
    role.configure(0, {"adapter": "c0", "scaling": 2.0, "ranks": [[0, "self_attn.q_proj", 4]], "split": 1,
                       "lr": 1e-2}, {})
    role.forward(0, {"adapter": "c0", "probe": False, "measure": "abs_sum"}, {"batch": np.arange(2)})
    kept = weakref.ref(role.pending[0][0])
    assert role.forget(0, {}, {}) == ({}, {})
    assert not role.pending and kept() is None
    assert role.forget(0, {}, {}) == ({}, {})  # nothing in flight: nothing to drop


def test_a_backward_that_carries_the_next_forward_does_what_the_two_requests_did():
    """One request an iteration (backward with args.forward) leaves the client's adapter, optimiser and kept
    graph as a backward then a forward do, and uploads the same activations."""
    def client_after_two_iterations(combined: bool):
        role = tiny_role("clients")
        role.configure(0, {"adapter": "c0", "scaling": 2.0, "ranks": [[0, "self_attn.q_proj", 4]], "split": 1,
                           "lr": 1e-2}, {})
        forward = {"adapter": "c0", "probe": False, "measure": "abs_sum"}
        hidden = role.forward(0, forward, {"batch": np.arange(2)})[1]["hidden"]
        grad = {"grad": np.linspace(-1, 1, hidden.size, dtype=np.float32).reshape(hidden.shape)}
        if combined:
            result, upload = role.backward(0, {"adapter": "c0", "forward": forward}, {**grad, "batch": np.arange(2, 4)})
            assert result["forward_s"] > 0
        else:
            assert role.backward(0, {"adapter": "c0"}, grad)[1] == {}
            upload = role.forward(0, forward, {"batch": np.arange(2, 4)})[1]
        return role, upload

    (apart, apart_upload), (together, together_upload) = (client_after_two_iterations(c) for c in (False, True))
    assert apart_upload.keys() == together_upload.keys() == {"hidden", "labels", "attention_mask"}
    assert all(np.array_equal(apart_upload[k], together_upload[k]) for k in apart_upload)
    assert set(apart.pending) == set(together.pending) == {0}
    adapters = [role.get_adapter(0, {"adapter": "c0"}, {})[1] for role in (apart, together)]
    assert all(np.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert all(torch.equal(a, b) for a, b in zip(*(
        [state["exp_avg"] for state in role.optimizers["c0"].state.values()] for role in (apart, together))))


def test_the_heap_gives_its_free_pages_back_every_few_optimizer_steps():
    """Clients' lasting tensors made amid each step's transient ones keep freed pages resident unless the heap
    is trimmed (runtime/heap.py: c_heap_trim; its effect on memory: benchmarks/fleet_scaling.py)."""
    from hsplit_sim.runtime.heap import c_heap_trim
    from hsplit_sim.training.roles import TRIM_EVERY_STEPS

    assert c_heap_trim() is not None  # glibc, as on every machine CI runs on
    role, trims = trained_role(), []
    role.trim_heap, role.steps_untrimmed = trims.append, 0
    for _ in range(2 * TRIM_EVERY_STEPS + 1):
        role.full_step(None, {"adapter": "a"}, {"batch": np.arange(2)})
    assert trims == [0, 0] and role.steps_untrimmed == 1
