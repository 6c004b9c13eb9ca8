"""What a worker process does with its model: the server role and the client role hosting virtual clients.

A worker loads the frozen base weights once. Each virtual client (and each server-side adapter) is an
adapter owning its tensors and optimizer, lent to a PEFT slot of its layout while it runs (training/adapters.py),
so a client costs its own state in memory and time, however many others the worker hosts.
Tensors come in and go out as numpy arrays; the wire never carries anything else.
"""

import contextlib
import os
import time

import numpy as np
import torch

from hsplit_sim.runtime.heap import c_heap_trim
from hsplit_sim.runtime.wire import from_json_arrays, json_arrays, page
from hsplit_sim.training.adapters import Adapter, AdapterSlots
from hsplit_sim.training.data import encode_examples, load_dataset, load_test_set, partition, prompt_text
from hsplit_sim.training.models import load_model, load_tokenizer
from hsplit_sim.training.probe import make_probe
from hsplit_sim.training.split import SplitLM, lora_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ranks_from_wire(triples: list) -> dict[int, dict[str, int]]:
    ranks: dict[int, dict[str, int]] = {}
    for layer, module, rank in triples:
        ranks.setdefault(int(layer), {})[module] = int(rank)
    return ranks


TRIM_EVERY_STEPS = 16  # at most 16 steps' freed pages stay resident; a trim took 3.7 ms of a 46 ms tiny step


def adamw_with_state(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the state it would make at its first step already made (step 0, zero moments). Made at that
    step, amid the step's transient tensors, a thousand clients' moments lie scattered over pages the transients
    leave free, which stay resident: made here, a tiny FedLoRA client worker of 1,000 clients peaked at 640 MiB
    instead of 730 to 760."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(0.0),
                              "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return optimizer


def make_role(args: dict):
    roles = {"server": ServerRole, "clients": ClientRole}
    if args.get("role") not in roles:
        raise ValueError(f"init: role must be one of {sorted(roles)}")
    return roles[args["role"]](args)


class Role:
    """Model, data and named adapters shared by both roles."""

    def __init__(self, args: dict):
        if os.environ.get("HSPLIT_SIM_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["HSPLIT_SIM_TORCH_THREADS"]))
        self.seed = int(args["seed"])
        self.trim_heap, self.steps_untrimmed = c_heap_trim(), 0
        self.device = resolve_device(args.get("torch_device", "auto"))
        data, model = args["data"], args["model"]
        train, evaluation = load_dataset(data["name"], data.get("dir"), data.get("train_examples"),
                                         data["eval_examples"], self.seed)
        texts = [f"{prompt_text(e.mr)} {e.ref}" for e in train]
        self.tokenizer = tokenizer = load_tokenizer(model.get("name"), model.get("path"), texts)
        self.train = self._tensors(encode_examples(train, tokenizer, data["max_length"]))
        self.evaluation = self._tensors(encode_examples(evaluation, tokenizer, data["max_length"]))
        self.test = load_test_set(data["name"], data.get("dir"), data.get("test_examples", 0), self.seed)
        self.max_new_tokens = data.get("max_new_tokens", 48)
        self.partition = partition(train, args["n_clients"], data["partition"]["kind"], self.seed,
                                   data["partition"].get("alpha", 0.5), data["partition"].get("by", "eatType"))
        torch.manual_seed(self.seed)
        self.model = load_model(model.get("name"), model.get("path")).to(self.device)
        self.lm = SplitLM(self.model)
        self.slots = AdapterSlots(self.model, self.seed)
        self.adapters: dict[str, Adapter] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.optimizer_args: dict[str, dict] = {}
        # what configure was told, by adapter, in the order they were made (reshape repeats it; dump_state)
        self.adapter_args: dict[str, dict] = {}
        self.splits: dict[str, int] = {}
        self.merged: set[str] = set()  # paths of the modules whose base weight a merge changed (dump_state)
        self.full_args: dict | None = None  # full fine-tuning's optimizer args, once set up (dump_state)
        self.loading: dict[str, np.ndarray] = {}  # load_state's pages before the last
        self.dumping: dict[str, torch.Tensor] = {}  # the arrays dump_state is sending page by page

    @property
    def peft(self):
        """The PEFT model around self.model, once an adapter was configured (None before)."""
        return self.slots.peft

    def _tensors(self, encoded) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(encoded, name)).to(self.device)
                for name in ("input_ids", "attention_mask", "labels")}

    def init_result(self) -> tuple[dict, dict]:
        sizes = [len(p) for p in self.partition]
        tensors = {f"partition.{k}": p for k, p in enumerate(self.partition)}
        return {"n_train": len(self.train["input_ids"]), "n_eval": len(self.evaluation["input_ids"]),
                "partition_sizes": sizes, "device": str(self.device)}, tensors

    def ops(self):
        return {"configure": self.configure, "reshape": self.reshape, "get_adapter": self.get_adapter,
                "set_adapter": self.set_adapter, "merge": self.merge, "evaluate": self.evaluate,
                "generate": self.generate, "dump_state": self.dump_state, "load_state": self.load_state}

    def configure(self, client, args, tensors):
        """(Re)create a named adapter with its ranks ([layer, module, rank] triples) and, if trained, its optimizer.

        Every adapter starts from the same seed: clients share one global initialisation, and a
        re-created adapter is a fresh one (A random, B zero). args["tail_penalty"] ({"weight", "gamma",
        "min_rank"}) adds HetLoRA's self-pruning term to its training loss (tail_penalty).
        """
        name = args["adapter"]
        self.adapter_args.pop(name, None)
        self.adapter_args[name] = args
        config = lora_config(self.lm.family, ranks_from_wire(args["ranks"]), args["scaling"])
        self.adapters[name] = self.slots.new(config)
        self.splits[name] = args.get("split", self.lm.n_layers)
        self.optimizers.pop(name, None)
        if args.get("lr") is not None:
            self.optimizer_args[name] = args
            self.optimizers[name] = self._optimizer(name)
        return {}, {}

    def reshape(self, client, args, tensors):
        """Re-create a trained adapter with other ranks (args["ranks"]) and, if given, split, carrying over what
        old and new share: each weight's leading rows of A (r x d_in) and columns of B (d_out x r), and where a
        weight's A or B kept or lost rows or columns, its AdamW moments cut the same way (the optimiser keeps
        training the rank that is left). What is new (a weight that gained rank, or a new weight) starts as a
        fresh adapter's (A from the seed, B zero) with fresh moments.
        """
        name = args["adapter"]
        old_values = self.adapters[name].state()
        old_moments = {}
        if name in self.optimizers:
            by_param = {p: n for n, p in old_values.items()}
            old_moments = {by_param[p]: state for p, state in self.optimizers[name].state.items()}
        self.configure(client, {**self.adapter_args[name], **args}, {})
        optimizer = self.optimizers.get(name)
        with torch.no_grad():
            for n, p in self.adapters[name].state().items():
                if n not in old_values:
                    continue
                old = old_values[n]
                overlap = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, p.shape))
                p[overlap] = old[overlap]
                if optimizer is not None and n in old_moments and all(b <= a for a, b in zip(old.shape, p.shape)):
                    optimizer.state[p] = {key: value[overlap].clone() if value.shape == old.shape else value.clone()
                                          for key, value in old_moments[n].items()}
        return {}, {}

    def tail_penalty(self, name: str) -> torch.Tensor | None:
        """HetLoRA's self-pruning term, weight x sum over weights of ||B[:, t:r]||_F ||A[t:r, :]||_F with
        t = max(floor(gamma r), min_rank): the ranks a prune would cut (none once r <= min_rank); None when the
        adapter has no such term."""
        penalty = self.adapter_args.get(name, {}).get("tail_penalty")
        if not penalty:
            return None
        total = torch.zeros((), device=self.device)
        params = self.adapters[name].params
        for a, b in zip(params[0::2], params[1::2]):
            start = max(int(penalty["gamma"] * a.shape[0]), penalty["min_rank"])
            if start < a.shape[0]:
                total = total + torch.linalg.norm(b[:, start:]) * torch.linalg.norm(a[start:])
        return penalty["weight"] * total

    def _optimizer(self, name: str) -> torch.optim.Optimizer:
        params = self.adapters[name].params
        for p in params:
            p.requires_grad_(True)
        args = self.optimizer_args[name]
        return adamw_with_state(params, lr=args["lr"], weight_decay=args.get("weight_decay", 0.0))

    def activate(self, *names: str) -> None:
        self.slots.activate([self.adapters[name] for name in names])

    def get_adapter(self, client, args, tensors):
        state = self.adapters[args["adapter"]].state()
        return {}, {key: value.detach().cpu().numpy() for key, value in state.items()}

    def set_adapter(self, client, args, tensors):
        """New values for an adapter. Its optimizer keeps its state (as SplitLoRA's code keeps it across
        aggregation) unless args["restart_optimizer"] says the values start a new local optimisation."""
        name = args["adapter"]
        state = self.adapters[name].state()
        if set(tensors) != set(state):
            mismatch = sorted(set(tensors) ^ set(state))[:4]
            raise ValueError(f"adapter {name}: tensors {mismatch} do not match its weights")
        self._copy_into(state, tensors)
        if name in self.optimizers and args.get("restart_optimizer"):
            self.optimizers[name] = self._optimizer(name)
        return {}, {}

    def merge(self, client, args, tensors):
        """W <- W + B @ A for every module "<path>" given as "<path>.B" and "<path>.A" (stacked factors)."""
        modules = {key[:-2] for key in tensors if key.endswith(".A")}
        if {m + suffix for m in modules for suffix in (".A", ".B")} != set(tensors):
            raise ValueError("merge needs an A and a B factor for every module")
        with torch.no_grad():
            for path in sorted(modules):
                weight = self.base_weight(path)
                delta = torch.from_numpy(np.array(tensors[path + ".B"])) @ torch.from_numpy(np.array(tensors[path + ".A"]))
                # GPT-2's Conv1D stores (d_in, d_out); nn.Linear stores (d_out, d_in).
                weight += (delta.T if self.lm.family == "gpt2" else delta).to(weight.device, weight.dtype)
        self.merged |= modules
        return {"modules": len(modules)}, {}

    def base_weight(self, path: str) -> torch.nn.Parameter:
        """The frozen weight of the module at `path` (below the PEFT wrapping once there is one)."""
        module = (self.peft if self.peft is not None else self.model).get_submodule(path)
        return getattr(module, "base_layer", module).weight

    def dump_state(self, client, args, tensors):
        """One page (wire.page) of everything training changed since init, for a checkpoint (load_state puts it
        back), from position args["start"] of _state's arrays; the reply's "next" is where the next page starts
        (None after the last). Pages keep every header bounded however many adapters the worker holds. The arrays
        (views of the tensors) are gathered once, at the first page, and held until the last."""
        if args["start"] == 0:
            self.dumping = self._state(args.get("merged_values", True))
        arrays, following = page(self.dumping, args["start"])
        if following is None:
            self.dumping = {}
        return {"next": following}, {key: value.detach().cpu().numpy() for key, value in arrays.items()}

    def _state(self, merged_values: bool) -> dict[str, torch.Tensor]:
        """Each adapter's configuration and values and its optimizer's state, the base weights merges changed
        (their values, not the merged factors: adding them again would round differently; only their paths with
        merged_values false, where another worker's dump holds the same values), every weight under full
        fine-tuning, and torch's random state, in one ordered dict: its JSON part as wire.json_arrays, then the
        tensors themselves (no copies)."""
        state = {"adapters": list(self.adapter_args.values()), "merged": sorted(self.merged), "full": self.full_args,
                 "optimizers": {}}
        out = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        for name in self.adapter_args:
            out.update({f"adapter.{name}.{key}": value for key, value in self.adapters[name].state().items()})
        for path in state["merged"] if merged_values else ():
            out[f"merged.{path}"] = self.base_weight(path)
        if self.full_args is not None:
            out.update({f"full.{key}": value for key, value in self.model.state_dict().items()})
        for name, optimizer in self.optimizers.items():
            saved = optimizer.state_dict()
            state["optimizers"][name] = saved["param_groups"]
            for index, values in saved["state"].items():
                out.update({f"optimizer.{name}.{index}.{key}": value for key, value in values.items()})
        return {**{key: torch.from_numpy(chunk) for key, chunk in json_arrays(state).items()}, **out}

    def load_state(self, client, args, tensors):
        """One page of what dump_state gave, from position args["start"] (0 starts a load): the pages before the
        last (args["last"] false) are kept until the last puts everything back (_load)."""
        if args["start"] == 0:
            self.loading = {}
        self.loading.update(tensors)
        if args["last"]:
            state, arrays = from_json_arrays(self.loading)
            self.loading = {}
            self._load(state, arrays)
        return {}, {}

    def _load(self, state: dict, tensors: dict[str, np.ndarray]) -> None:
        """Over whatever this worker has configured since init: the adapters are made again in their order
        (configure), then take their values, optimizer states and the changed base weights; adapters the dump
        does not name are deleted."""
        stale = set(self.adapter_args) - {adapter["adapter"] for adapter in state["adapters"]}
        for adapter in state["adapters"]:
            self.configure(None, adapter, {})
        for name in stale:
            for held in (self.adapters, self.adapter_args, self.splits, self.optimizers, self.optimizer_args):
                held.pop(name, None)
        if state["full"] is not None:
            self.setup_full(None, state["full"], {})
        with torch.no_grad():
            for name in self.adapter_args:
                prefix = f"adapter.{name}."
                self._copy_into(self.adapters[name].state(), {key[len(prefix):]: value for key, value in tensors.items()
                                                              if key.startswith(prefix)})
            for path in state["merged"]:
                self.base_weight(path).copy_(self._tensor(tensors[f"merged.{path}"]))
            self.merged = set(state["merged"])
            if state["full"] is not None:
                self.model.load_state_dict({key[len("full."):]: self._tensor(value)
                                            for key, value in tensors.items() if key.startswith("full.")})
        for name, groups in state["optimizers"].items():
            prefix = f"optimizer.{name}."
            saved: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, field = key[len(prefix):].split(".", 1)
                    saved.setdefault(int(index), {})[field] = torch.from_numpy(np.array(value))
            self.optimizers[name].load_state_dict({"state": saved, "param_groups": groups})
        torch.set_rng_state(torch.from_numpy(np.array(tensors["rng.cpu"])))
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.from_numpy(np.array(tensors[f"rng.cuda.{i}"]))
                                          for i in range(torch.cuda.device_count())])

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(value)).to(self.device)

    def _copy_into(self, params: dict[str, torch.nn.Parameter], values: dict[str, np.ndarray]) -> None:
        """Values into an adapter's weights, by key (every weight named once)."""
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(self._tensor(values[key]))

    def batch(self, tensors) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.array(tensors["batch"])).to(self.device)
        return {k: v[index] for k, v in self.train.items()}

    def train_step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Gradients kept between steps would cost every client its adapter's size again, and, allocated
        # amid a step's activations, fragment the heap (about 1 MiB of RSS per tiny client).
        optimizer.zero_grad(set_to_none=True)
        self._stepped()

    def _stepped(self) -> None:
        """Every TRIM_EVERY_STEPS optimizer steps, the heap's free pages go back to the system (c_heap_trim)."""
        self.steps_untrimmed += 1
        if self.steps_untrimmed >= TRIM_EVERY_STEPS and self.trim_heap is not None:
            self.trim_heap(0)
            self.steps_untrimmed = 0

    def _trained(self, name: str | None) -> list[torch.nn.Parameter]:
        """The adapter's parameters, in its optimizer's order, with it activated; none for IWI's probe before
        training (name None), which trains nothing."""
        if name is None:
            return []
        self.activate(name)
        return [p for group in self.optimizers[name].param_groups for p in group["params"]]

    def _step(self, name: str | None, params: list[torch.nn.Parameter], grads) -> None:
        """A split step's optimizer step, on the gradients autograd gave the parameters _trained returned."""
        if name is None:
            return
        for param, grad in zip(params, grads):
            param.grad = grad
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)  # as train_step: no gradient kept between steps
        self._stepped()

    def full_step(self, client, args, tensors):
        """A whole-model step with one adapter (federated clients, CenLoRA) or every weight (FT: adapter null).
        The adapter's tail penalty, if it has one, joins the objective; the loss reported is the model's alone."""
        batch = self.batch(tensors)
        name = args.get("adapter")
        if name is None:
            loss = self.lm.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
            self.train_step("full", loss)
        else:
            self.activate(name)
            loss = self.lm.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
            penalty = self.tail_penalty(name)
            self.train_step(name, loss if penalty is None else loss + penalty)
        return {"loss": loss.item()}, {}

    def evaluate(self, client, args, tensors):
        """Token-weighted mean loss over the evaluation set with the named adapters active (none: base weights)."""
        adapters = args.get("adapters") or []
        if adapters:
            self.activate(*adapters)
        batch_size = args["batch_size"]
        total, tokens = 0.0, 0
        with torch.no_grad(), self._adapters_off(not adapters):
            for start in range(0, len(self.evaluation["input_ids"]), batch_size):
                batch = {k: v[start:start + batch_size] for k, v in self.evaluation.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss = self.lm.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
                total += loss.item() * n
                tokens += n
        return {"loss": total / tokens, "tokens": tokens}, {}

    def generate(self, client, args, tensors):
        """Greedy decoding of the test MRs (left-padded batches) with the named adapters active."""
        adapters = args.get("adapters") or []
        if adapters:
            self.activate(*adapters)
        pad, eos = self.tokenizer.pad_id, self.tokenizer.eos_id
        # Embedding rows past the tokenizer's vocabulary (a tiny model's word list built from few examples) were
        # never a target: they must not be generated, and could not be decoded.
        unused = list(range(self.tokenizer.vocab_size, self.model.config.vocab_size)) or None
        prompts = [self.tokenizer.encode(prompt_text(mr)) for mr, _ in self.test]
        texts = []
        with torch.no_grad(), self._adapters_off(not adapters):
            for start in range(0, len(prompts), args["batch_size"]):
                chunk = prompts[start:start + args["batch_size"]]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, prompt in enumerate(chunk):
                    ids[row, width - len(prompt):] = torch.tensor(prompt)
                    mask[row, width - len(prompt):] = 1
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=pad, eos_token_id=eos, suppress_tokens=unused)
                for row in out[:, width:].tolist():
                    texts.append(self.tokenizer.decode(row[:row.index(eos)] if eos in row else row).strip())
        return {"mrs": [mr for mr, _ in self.test], "references": [refs for _, refs in self.test],
                "hypotheses": texts}, {}

    def _adapters_off(self, off: bool):
        return self.peft.disable_adapter() if off and self.peft is not None else contextlib.nullcontext()


class ClientRole(Role):
    """Hosts many virtual clients (adapter "c<k>" each) that share one copy of the frozen weights."""

    def __init__(self, args: dict):
        super().__init__(args)
        self.pending: dict[int, tuple[torch.Tensor, dict]] = {}

    def ops(self):
        return dict(super().ops(), forward=self.forward, backward=self.backward, forget=self.forget,
                    full_step=self.full_step)

    def forward(self, client, args, tensors):
        """Client forward on the batch's indices; what a real client would upload comes back.

        With probe, the forward also keeps what IWI's importance needs (training/probe.py). Without an adapter
        (None) it is IWI's probe before training: the base model cut at args["split"].
        """
        name = args["adapter"]
        batch = self.batch(tensors)
        if name is not None:
            self.activate(name)  # before the probe: activating an adapter freezes every other weight
        split = args["split"] if name is None else self.splits[name]
        probe = make_probe(self.lm, 0, split, args)
        with probe, self._adapters_off(name is None):
            hidden = self.lm.client_forward(batch["input_ids"], batch["attention_mask"], split)
        self.pending[client] = (hidden, probe)
        return {}, {"hidden": hidden.detach().cpu().numpy(), "labels": batch["labels"].cpu().numpy(),
                    "attention_mask": batch["attention_mask"].cpu().numpy()}

    def forget(self, client, args, tensors):
        """The client was stopped before the backward of its last forward: that forward's graph goes now, not at
        the client's next forward (a round's deadline may stop many clients)."""
        self.pending.pop(client, None)
        return {}, {}

    def backward(self, client, args, tensors):
        """Client backward and optimizer step (none without an adapter); after a probe, also the importance of
        the segment's weights. With args["forward"] (forward's args, the batch as tensor "batch"), the client's
        next forward follows in the same request and its upload comes back: one request an iteration instead
        of two."""
        hidden, probe = self.pending.pop(client)
        params = self._trained(args["adapter"])  # other clients' forwards froze this client's adapter since
        with probe:
            grads = torch.autograd.grad(hidden, params + probe.inputs(),
                                        grad_outputs=torch.from_numpy(np.array(tensors["grad"])).to(self.device))
        self._step(args["adapter"], params, grads[:len(params)])
        result = {"importance": probe.scores(grads[len(params):])}
        if "forward" not in args:
            return result, {}
        started = time.perf_counter()
        _, upload = self.forward(client, args["forward"], {"batch": tensors["batch"]})
        return dict(result, forward_s=time.perf_counter() - started), upload


class ServerRole(Role):
    """Server-side segments, the centralised baselines, and evaluation of the whole model."""

    def ops(self):
        return dict(super().ops(), step=self.server_step, full_step=self.full_step, setup_full=self.setup_full)

    def server_step(self, client, args, tensors):
        name = args["adapter"]
        split = args["split"]
        hidden = torch.from_numpy(np.array(tensors["hidden"])).to(self.device).requires_grad_(True)
        mask = torch.from_numpy(np.array(tensors["attention_mask"])).to(self.device)
        labels = torch.from_numpy(np.array(tensors["labels"])).to(self.device)
        params = self._trained(name)  # before the probe: activating an adapter freezes every other weight
        probe = make_probe(self.lm, split, self.lm.n_layers, args)
        with probe, self._adapters_off(name is None):
            loss = self.lm.server_loss(hidden, mask, labels, split)
            # A shared server-side adapter also covers blocks below this client's split: those get no gradient.
            grads = torch.autograd.grad(loss, [hidden] + params + probe.inputs(), allow_unused=True)
        self._step(name, params, grads[1:1 + len(params)])
        return ({"loss": loss.item(), "importance": probe.scores(grads[1 + len(params):])},
                {"grad": grads[0].cpu().numpy()})

    def setup_full(self, client, args, tensors):
        """Full fine-tuning (FT): every weight trains, embeddings included."""
        self.full_args = dict(args)
        self.model.requires_grad_(True)
        self.optimizers["full"] = torch.optim.AdamW(self.model.parameters(), lr=args["lr"],
                                                    weight_decay=args.get("weight_decay", 0.0))
        return {}, {}
