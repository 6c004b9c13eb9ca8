"""Cost of virtual clients: the federated LoRA workload through `hsplit-sim run` and as a plain loop, as K grows.

The workload: tiny GPT-2, FedLoRA at rank 8 on c_attn, K clients x R rounds x S local steps of batch 4, an
evaluation before the first round and after every round. The plain loop is one PyTorch process doing the same
optimiser steps on the same batches: every client owns its adapter tensors and AdamW, put into one LoRA
adapter for its steps; FedAvg of A and B apart after each round. Each side runs as its own process, one after
the other, and prints: training time (rounds 1..R with their evaluations, after set-up), whole-process time,
the CPU seconds of the whole process tree (user + system: less moved by other load than wall time), peak memory
of the process tree (RSS summed over the process and its children, polled every 20 ms; and PSS summed, polled
every 0.5 s, which counts a page the processes share once: see watched), and the ratios hsplit-sim / plain.
The machine's load moves these figures: compare the two sides of one line.

    python benchmarks/fleet_scaling.py                  # K = 4, 20, 100
    python benchmarks/fleet_scaling.py --large          # and K = 1000 (1 round, 1 step)
    python benchmarks/fleet_scaling.py --clients 100    # one K
    python benchmarks/fleet_scaling.py --client-workers 2   # hsplit-sim's clients on two worker processes
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# (K, R, S): clients, rounds, local steps per round
SIZES = [(4, 5, 5), (20, 3, 2), (100, 3, 2)]
LARGE = [(1000, 1, 1)]
SEED, RANK, ALPHA, BATCH, LR = 0, 8, 16, 4, 1.0e-3
# The goals this benchmark measures: training at most this many times the plain loop's at every K, and the whole
# process tree's peak under this many MiB at K = 1000 (the plain loop is no bound for it: its heap grows too).
TRAINING_RATIO_GOAL, PEAK_MIB_GOAL_AT_1000 = 1.2, 1.2 * 1024
PSS_EVERY = 25  # samples: RSS is read every 20 ms, PSS every 0.5 s


def scenario(clients: int, rounds: int, steps: int, output: str, client_workers: int = 1) -> dict:
    return {
        "name": f"fleet-{clients}",
        "seed": SEED,
        "model": {"name": "tiny-gpt2"},
        "data": {"name": "e2e-synthetic", "max_length": 48, "train_examples": max(64, 4 * clients),
                 "eval_examples": 16, "partition": {"kind": "iid"}},
        "algorithm": {"name": "fedlora", "rank": RANK, "alpha": ALPHA, "targets": ["q", "v"]},
        "training": {"rounds": rounds, "local_steps": steps, "batch_size": BATCH, "lr": LR, "eval_every": 1},
        "server": {"device": "rtx-3090", "accelerators": 1},
        "clients": [{"count": clients, "device": "jetson-agx-orin", "link": "wifi-6"}],
        "runtime": {"client_workers": client_workers, "torch_device": "cpu"},
        "output": {"dir": output},
    }


def plain_loop(clients: int, rounds: int, steps: int) -> dict:
    """The workload in this process, no simulator: training seconds and evaluation losses."""
    import numpy as np
    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    from hsplit_sim import costs
    from hsplit_sim.algorithms.aggregation import data_weights, fedavg
    from hsplit_sim.backends.real import batch_indices
    from hsplit_sim.training.data import encode_examples, load_dataset, partition, prompt_text
    from hsplit_sim.training.models import load_model, load_tokenizer
    from hsplit_sim.training.split import SplitLM, lora_config

    data = scenario(clients, rounds, steps, "")["data"]
    train, evaluation = load_dataset(data["name"], None, data["train_examples"], data["eval_examples"], SEED)
    tokenizer = load_tokenizer("tiny-gpt2", None, [f"{prompt_text(e.mr)} {e.ref}" for e in train])
    train_t = {k: torch.from_numpy(v) for k, v in vars(encode_examples(train, tokenizer, data["max_length"])).items()}
    eval_t = {k: torch.from_numpy(v)
              for k, v in vars(encode_examples(evaluation, tokenizer, data["max_length"])).items()}
    parts = partition(train, clients, "iid", SEED)
    model = load_model("tiny-gpt2", None)
    lm = SplitLM(model)
    spec = costs.ModelSpec.from_hf_config(model.config.to_dict())
    ranks = costs.uniform_ranks(spec, ["q", "v"], range(lm.n_layers), RANK)
    torch.manual_seed(SEED)
    peft = get_peft_model(model, lora_config(lm.family, ranks, ALPHA / RANK), adapter_name="slot")
    keys = list(get_peft_model_state_dict(peft, adapter_name="slot"))
    layers = [(m.lora_A["slot"], m.lora_B["slot"]) for m in peft.modules() if hasattr(m, "lora_A")]
    initial = [(a.weight.detach().clone(), b.weight.detach().clone()) for a, b in layers]

    def fresh() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(t.clone()) for pair in initial for t in pair]

    def bind(params: list[torch.nn.Parameter]) -> None:
        for (a, b), pa, pb in zip(layers, params[0::2], params[1::2]):
            a.weight, b.weight = pa, pb

    def evaluate(params) -> float:
        bind(params)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(eval_t["input_ids"]), BATCH):
                b = {k: v[start:start + BATCH] for k, v in eval_t.items()}
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(lm.loss(b["input_ids"], b["attention_mask"], b["labels"])) * n
                tokens += n
        return total / tokens

    client_params = [fresh() for _ in range(clients)]
    optimizers = [torch.optim.AdamW(p, lr=LR, weight_decay=0.0) for p in client_params]
    global_params = fresh()
    losses = [evaluate(global_params)]
    started = time.monotonic()
    weights = data_weights([len(p) for p in parts])
    for r in range(1, rounds + 1):
        for k in range(clients):
            bind(client_params[k])
            for step in range(steps):
                idx = torch.from_numpy(batch_indices(parts[k], BATCH, (r - 1) * steps + step, SEED))
                b = {key: v[idx] for key, v in train_t.items()}
                loss = lm.loss(b["input_ids"], b["attention_mask"], b["labels"])
                optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[k].step()
        states = [dict(zip(keys, (p.detach().numpy() for p in params))) for params in client_params]
        merged = fedavg(states, weights)
        with torch.no_grad():
            for params in client_params + [global_params]:
                for p, key in zip(params, keys):
                    p.copy_(torch.from_numpy(merged[key]))
        losses.append(evaluate(global_params))
    return {"training_s": time.monotonic() - started, "losses": losses}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def watched(command: list[str]) -> tuple[float, float, int, int, str]:
    """Run command; (whole seconds, CPU seconds of its process tree, peak RSS and peak PSS of the tree in bytes,
    stdout). Summed RSS counts a page shared by several processes (torch's libraries, about 130 MiB of them
    resident in each worker) once per process; PSS shares it out among them, so its sum is what the tree
    takes of the machine's memory."""
    # OpenMP's spin-waiting as hsplit-sim's workers get it (runtime/launcher.py), on both sides
    env = {"GOMP_SPINCOUNT": "10000", **os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started, cpu = time.monotonic(), children_cpu_s()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        root, peak_rss, peak_pss, samples = psutil.Process(proc.pid), 0, 0, 0
        while proc.poll() is None:
            with_pss = samples % PSS_EVERY == 0  # reading PSS takes the kernel about 4 ms a process
            rss = pss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    memory = p.memory_full_info() if with_pss else p.memory_info()
                    rss, pss = rss + memory.rss, pss + (memory.pss if with_pss else 0)
            except psutil.Error:
                pass  # a process ended between listing and reading: this sample is partial
            peak_rss, peak_pss, samples = max(peak_rss, rss), max(peak_pss, pss), samples + 1
            time.sleep(0.02)
        elapsed, cpu = time.monotonic() - started, children_cpu_s() - cpu
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise SystemExit(f"{command[:3]} failed ({proc.returncode}):\n{text[-3000:]}")
    return elapsed, cpu, peak_rss, peak_pss, text


def simulated(clients: int, rounds: int, steps: int, client_workers: int) -> dict:
    import pandas as pd

    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "fleet.json"  # JSON is YAML
        path.write_text(json.dumps(scenario(clients, rounds, steps, out, client_workers)))
        cli = shutil.which("hsplit-sim", path=str(Path(sys.executable).parent)) or "hsplit-sim"
        whole, cpu, peak, pss, _ = watched([cli, "run", str(path)])
        rounds_table = pd.read_parquet(next(Path(out).glob("fleet-*/rounds.parquet")))
    wall = rounds_table["wall_time_s"]
    return {"training_s": wall.iloc[-1] - wall.iloc[0], "whole_s": whole, "cpu_s": cpu, "peak": peak, "pss": pss,
            "losses": rounds_table["eval_loss"].tolist()}


def plain(clients: int, rounds: int, steps: int) -> dict:
    whole, cpu, peak, pss, text = watched([sys.executable, __file__, "--plain", str(clients), str(rounds),
                                           str(steps)])
    return {**json.loads(text.strip().splitlines()[-1]), "whole_s": whole, "cpu_s": cpu, "peak": peak, "pss": pss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also K = 1000 (1 round, 1 local step)")
    parser.add_argument("--clients", type=int, nargs="+", help="only these K (of the sizes above)")
    parser.add_argument("--client-workers", type=int, default=1,
                        help="hsplit-sim's client worker processes (clients' local steps on different workers run at "
                        "once); the plain loop is one process either way")
    parser.add_argument("--plain", type=int, nargs=3, help=argparse.SUPPRESS)  # K R S: the plain loop's process
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(*args.plain)))
        return
    sizes = SIZES + (LARGE if args.large or (args.clients and 1000 in args.clients) else [])
    sizes = [s for s in sizes if not args.clients or s[0] in args.clients]
    print(f"FedLoRA, tiny-gpt2, rank {RANK} on c_attn, batch {BATCH}; {args.client_workers} client worker(s); "
          f"{os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'K, R, S':>12} | {'training s: plain / sim / ratio':>31} | {'whole s: plain / sim / ratio':>28} | "
          f"{'CPU s: plain / sim / ratio':>28} | {'peak RSS MiB: plain / sim / ratio':>34} | "
          f"{'peak PSS MiB: plain / sim':>26} | same losses | goals met")
    for k, r, s in sizes:
        p = plain(k, r, s)
        h = simulated(k, r, s, args.client_workers)
        same = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(p["losses"], h["losses"]))
        goals = h["training_s"] <= TRAINING_RATIO_GOAL * p["training_s"] and (
            k != 1000 or h["peak"] < PEAK_MIB_GOAL_AT_1000 * 2**20)
        print(f"{f'{k}, {r}, {s}':>12} | {p['training_s']:9.2f} {h['training_s']:9.2f} "
              f"{h['training_s'] / p['training_s']:9.2f}   | {p['whole_s']:8.2f} {h['whole_s']:8.2f} "
              f"{h['whole_s'] / p['whole_s']:8.2f}   | {p['cpu_s']:8.2f} {h['cpu_s']:8.2f} "
              f"{h['cpu_s'] / p['cpu_s']:8.2f}   | {p['peak'] / 2**20:8.0f} {h['peak'] / 2**20:8.0f} "
              f"{h['peak'] / p['peak']:12.2f}   | {p['pss'] / 2**20:12.0f} {h['pss'] / 2**20:12.0f}"
              f" | {str(same):>11} | {goals}", flush=True)
    print(f"goals: training at most {TRAINING_RATIO_GOAL}x the plain loop's; at K = 1000, peak (summed RSS, as the "
          f"goal was set) under {PEAK_MIB_GOAL_AT_1000:.0f} MiB")


if __name__ == "__main__":
    main()
