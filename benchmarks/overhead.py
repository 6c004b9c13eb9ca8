"""Overhead of the simulator: the same SplitLoRA training work through `hsplit-sim run` and as a plain loop.

Both sides use one model, one data partition, the same batches, steps, LoRA scaling, optimiser (kept across
aggregation, as SplitLoRA's is) and FedAvg rounds, take the clients' turns on the shared server-side adapter in
the order the simulator's server steps happened, and evaluate at the same points: their evaluation losses agree
to float rounding. Printed per model: the wall time of the training rounds on each side (after model loading and
the first evaluation) and their ratio; start-up times are printed beside them.

    python benchmarks/overhead.py                      # tiny-gpt2 and smollm2-135m
    python benchmarks/overhead.py --model tiny-gpt2
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import data_weights, fedavg
from hsplit_sim.backends.real import batch_indices
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import load_scenario
from hsplit_sim.training.data import encode_examples, load_dataset, partition, prompt_text
from hsplit_sim.training.models import load_model, load_tokenizer
from hsplit_sim.training.split import SplitLM, lora_config

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"


def plain_loop(scenario, turns: dict[int, list[int]]) -> tuple[float, float, list[float]]:
    """SplitLoRA in one process, no simulator, the clients' server steps of each round in the order `turns`
    gives: (start-up seconds, training seconds, eval losses)."""
    started = time.monotonic()
    data, algo, training = scenario.data, scenario.algorithm, scenario.training
    n_clients = sum(group.count for group in scenario.clients)
    train, evaluation = load_dataset(data.name, data.dir, data.train_examples, data.eval_examples, scenario.seed)
    tokenizer = load_tokenizer(scenario.model.name, scenario.model.path,
                               [f"{prompt_text(e.mr)} {e.ref}" for e in train])
    train_t = {k: torch.from_numpy(v) for k, v in vars(encode_examples(train, tokenizer, data.max_length)).items()}
    eval_t = {k: torch.from_numpy(v) for k, v in vars(encode_examples(evaluation, tokenizer, data.max_length)).items()}
    parts = partition(train, n_clients, data.partition.kind, scenario.seed)
    torch.manual_seed(scenario.seed)
    model = load_model(scenario.model.name, scenario.model.path)
    lm = SplitLM(model)
    spec = costs.ModelSpec.from_hf_config(model.config.to_dict())
    family, split, layers = lm.family, algo.split_layer, lm.n_layers

    def adapter(name, span):
        torch.manual_seed(scenario.seed)
        config = lora_config(family, costs.uniform_ranks(spec, algo.targets, span, algo.rank), algo.scaling)
        if not hasattr(adapter, "peft"):
            adapter.peft = get_peft_model(model, config, adapter_name=name)
        else:
            adapter.peft.add_adapter(name, config)

    def optimizer(name):
        params = [p for n, p in adapter.peft.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)

    adapter("server", range(split, layers))
    for k in range(n_clients):
        adapter(f"c{k}", range(split))
    adapter("global_client", range(split))
    peft = adapter.peft
    server_opt = optimizer("server")
    client_opts = {k: optimizer(f"c{k}") for k in range(n_clients)}

    def evaluate():
        peft.base_model.set_adapter(["global_client", "server"])
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(eval_t["input_ids"]), training.batch_size):
                b = {k: v[start:start + training.batch_size] for k, v in eval_t.items()}
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(lm.loss(b["input_ids"], b["attention_mask"], b["labels"])) * n
                tokens += n
        return total / tokens

    losses = [evaluate()]
    setup = time.monotonic() - started
    started = time.monotonic()
    weights = data_weights([len(p) for p in parts])
    for r in range(1, training.rounds + 1):
        steps_done = [0] * n_clients
        for k in turns[r]:
            step, steps_done[k] = steps_done[k], steps_done[k] + 1
            idx = torch.from_numpy(batch_indices(parts[k], training.batch_size,
                                                 (r - 1) * training.local_steps + step, scenario.seed))
            b = {key: v[idx] for key, v in train_t.items()}
            peft.base_model.set_adapter([f"c{k}", "server"])
            hidden = lm.client_forward(b["input_ids"], b["attention_mask"], split)
            loss = lm.server_loss(hidden, b["attention_mask"], b["labels"], split)
            server_opt.zero_grad(set_to_none=True)
            client_opts[k].zero_grad(set_to_none=True)
            loss.backward()
            server_opt.step()
            client_opts[k].step()
        states = [{n: t.numpy() for n, t in get_peft_model_state_dict(peft, adapter_name=f"c{k}").items()}
                  for k in range(n_clients)]
        merged = {n: torch.from_numpy(t) for n, t in fedavg(states, weights).items()}
        for name in [f"c{k}" for k in range(n_clients)] + ["global_client"]:
            set_peft_model_state_dict(peft, merged, adapter_name=name)
        if r % training.eval_every == 0 or r == training.rounds:
            losses.append(evaluate())
    return setup, time.monotonic() - started, losses


def simulated(scenario) -> tuple[float, float, list[float], dict[int, list[int]]]:
    """(start-up seconds, training seconds, eval losses, each round's clients in the order of their server
    steps in simulated time)."""
    started = time.monotonic()
    run_dir = run_scenario(scenario, progress=False)
    total = time.monotonic() - started
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    training = rounds["wall_time_s"].iloc[-1] - rounds["wall_time_s"].iloc[0]
    steps = pd.read_parquet(run_dir / "events.parquet").query("kind == 'server_step'")
    turns = {int(r): group.sort_values("start_s", kind="stable")["client"].tolist()
             for r, group in steps.groupby("round")}
    return total - training, training, rounds["eval_loss"].dropna().tolist(), turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny-gpt2", "smollm2-135m"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    for model in args.model:
        with tempfile.TemporaryDirectory() as out:
            scenario = load_scenario(SCENARIO, [f"model.name={model}", f"output.dir={out}"] + args.overrides)
            sim_setup, sim_train, sim_losses, turns = simulated(scenario)
        plain_setup, plain_train, plain_losses = plain_loop(scenario, turns)
        steps = sum(len(clients) for clients in turns.values())
        print(f"model {model}: {steps} training steps, torch threads {torch.get_num_threads()}")
        print(f"hsplit-sim  training {sim_train:8.2f} s   (start-up {sim_setup:6.2f} s)")
        print(f"plain loop  training {plain_train:8.2f} s   (start-up {plain_setup:6.2f} s)")
        print(f"ratio       {sim_train / plain_train:.3f}")
        print(f"eval losses hsplit-sim {np.round(sim_losses, 4).tolist()}")
        print(f"eval losses plain loop {np.round(plain_losses, 4).tolist()}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
