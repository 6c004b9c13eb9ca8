"""What a worker process does with its model: the server role and the client role hosting virtual clients.

A worker loads the frozen base weights once. Each virtual client (and each server-side adapter) is a
named PEFT adapter with its own optimizer, so per-client memory is adapters plus optimizer state only.
Tensors come in and go out as numpy arrays; the wire never carries anything else.
"""

import os

import numpy as np
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from hsplit_sim.training.data import encode_examples, load_dataset, partition, prompt_text
from hsplit_sim.training.models import load_model, load_tokenizer
from hsplit_sim.training.split import SplitLM, causal_lm_loss, lora_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ranks_from_wire(triples: list) -> dict[int, dict[str, int]]:
    ranks: dict[int, dict[str, int]] = {}
    for layer, module, rank in triples:
        ranks.setdefault(int(layer), {})[module] = int(rank)
    return ranks


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
        self.device = resolve_device(args.get("torch_device", "auto"))
        data, model = args["data"], args["model"]
        train, evaluation = load_dataset(data["name"], data.get("dir"), data.get("train_examples"),
                                         data["eval_examples"], self.seed)
        texts = [f"{prompt_text(e.mr)} {e.ref}" for e in train]
        tokenizer = load_tokenizer(model.get("name"), model.get("path"), texts)
        self.train = self._tensors(encode_examples(train, tokenizer, data["max_length"]))
        self.evaluation = self._tensors(encode_examples(evaluation, tokenizer, data["max_length"]))
        self.partition = partition(train, args["n_clients"], data["partition"]["kind"], self.seed,
                                   data["partition"].get("alpha", 0.5), data["partition"].get("by", "eatType"))
        torch.manual_seed(self.seed)
        self.model = load_model(model.get("name"), model.get("path")).to(self.device)
        self.lm = SplitLM(self.model)
        self.peft = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def _tensors(self, encoded) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(encoded, name)).to(self.device)
                for name in ("input_ids", "attention_mask", "labels")}

    def init_result(self) -> tuple[dict, dict]:
        sizes = [len(p) for p in self.partition]
        tensors = {f"partition.{k}": p for k, p in enumerate(self.partition)}
        return {"n_train": len(self.train["input_ids"]), "n_eval": len(self.evaluation["input_ids"]),
                "partition_sizes": sizes, "device": str(self.device)}, tensors

    def add_adapter(self, name: str, args: dict, ranks: list, trainable: bool) -> None:
        """Same seed for every adapter: all clients start from one global initialisation.

        ranks: [layer, module suffix, rank] triples, as they cross the wire in JSON.
        """
        config = lora_config(self.lm.family, ranks_from_wire(ranks), args["alpha"])
        torch.manual_seed(self.seed)
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        if trainable:
            self.optimizers[name] = self._optimizer(name, args)

    def _optimizer(self, name: str, args: dict) -> torch.optim.Optimizer:
        params = self.adapter_parameters(name)
        for p in params:
            p.requires_grad_(True)
        return torch.optim.AdamW(params, lr=args["lr"], weight_decay=args.get("weight_decay", 0.0))

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n]

    def activate(self, *names: str) -> None:
        self.peft.base_model.set_adapter(list(names))

    def adapter_state(self, name: str) -> dict[str, np.ndarray]:
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        return {key: value.detach().cpu().numpy() for key, value in state.items()}

    def load_adapter_state(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        expected = set(get_peft_model_state_dict(self.peft, adapter_name=name))
        if set(tensors) != expected:
            raise ValueError(f"adapter {name}: got tensors {sorted(set(tensors) ^ expected)[:4]} that do not match")
        state = {key: torch.from_numpy(np.array(value)).to(self.device) for key, value in tensors.items()}
        set_peft_model_state_dict(self.peft, state, adapter_name=name)

    def step(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def evaluate(self, client, args, tensors):
        """Token-weighted mean loss over the evaluation set with the named adapters active."""
        self.activate(*args["adapters"])
        batch_size = args["batch_size"]
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.evaluation["input_ids"]), batch_size):
                batch = {k: v[start:start + batch_size] for k, v in self.evaluation.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss = self.lm.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
                total += float(loss) * n
                tokens += n
        return {"loss": total / tokens, "tokens": tokens}, {}


class ClientRole(Role):
    """Hosts many virtual clients: client-side segments that share one copy of the frozen weights."""

    def __init__(self, args: dict):
        super().__init__(args)
        self.splits: dict[int, int] = {}
        self.pending: dict[int, torch.Tensor] = {}
        self.optimizer_args: dict[int, dict] = {}

    def ops(self):
        return {"setup_client": self.setup_client, "forward": self.forward, "backward": self.backward,
                "get_adapter": self.get_adapter, "set_adapter": self.set_adapter}

    def setup_client(self, client, args, tensors):
        self.splits[client] = args["split"]
        self.optimizer_args[client] = args
        self.add_adapter(f"c{client}", args, args["ranks"], trainable=True)
        return {}, {}

    def forward(self, client, args, tensors):
        """Client forward on the batch's indices; what a real client would upload comes back."""
        index = torch.from_numpy(np.array(tensors["batch"])).to(self.device)
        batch = {k: v[index] for k, v in self.train.items()}
        self.activate(f"c{client}")
        hidden = self.lm.client_forward(batch["input_ids"], batch["attention_mask"], self.splits[client])
        self.pending[client] = hidden
        return {}, {"hidden": hidden.detach().cpu().numpy(), "labels": batch["labels"].cpu().numpy(),
                    "attention_mask": batch["attention_mask"].cpu().numpy()}

    def backward(self, client, args, tensors):
        hidden = self.pending.pop(client)
        grad = torch.from_numpy(np.array(tensors["grad"])).to(self.device)
        optimizer = self.optimizers[f"c{client}"]
        optimizer.zero_grad(set_to_none=True)
        hidden.backward(grad)
        optimizer.step()
        return {}, {}

    def get_adapter(self, client, args, tensors):
        return {}, self.adapter_state(f"c{client}")

    def set_adapter(self, client, args, tensors):
        """New adapter values start a new local optimisation, so the optimizer state starts afresh."""
        name = f"c{client}"
        self.load_adapter_state(name, tensors)
        self.optimizers[name] = self._optimizer(name, self.optimizer_args[client])
        return {}, {}


class ServerRole(Role):
    """Server-side segments, the centralised baselines, and evaluation of the whole model."""

    def ops(self):
        return {"setup_server": self.setup_server, "step": self.server_step, "set_adapter": self.set_adapter,
                "evaluate": self.evaluate, "setup_central": self.setup_central, "central_step": self.central_step}

    def setup_server(self, client, args, tensors):
        """One server-side adapter that clients use in turn, plus the global client-side adapter for evaluation."""
        self.split = args["split"]
        self.add_adapter("server", args, args["server_ranks"], trainable=True)
        self.add_adapter("global_client", args, args["client_ranks"], trainable=False)
        return {}, {}

    def server_step(self, client, args, tensors):
        hidden = torch.from_numpy(np.array(tensors["hidden"])).to(self.device).requires_grad_(True)
        mask = torch.from_numpy(np.array(tensors["attention_mask"])).to(self.device)
        labels = torch.from_numpy(np.array(tensors["labels"])).to(self.device)
        self.activate("server")
        loss = self.lm.server_loss(hidden, mask, labels, self.split)
        self.step("server", loss)
        return {"loss": loss.item()}, {"grad": hidden.grad.cpu().numpy()}

    def set_adapter(self, client, args, tensors):
        self.load_adapter_state(args["adapter"], tensors)
        return {}, {}

    def setup_central(self, client, args, tensors):
        self.add_adapter("central", args, args["ranks"], trainable=True)
        return {}, {}

    def central_step(self, client, args, tensors):
        index = torch.from_numpy(np.array(tensors["batch"])).to(self.device)
        batch = {k: v[index] for k, v in self.train.items()}
        self.activate("central")
        loss = self.lm.loss(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.step("central", loss)
        return {"loss": loss.item()}, {}
