"""Loading a scenario: YAML, `--set` overrides, schema validation and the checks that need the model config.

Every problem becomes one ScenarioError line that names the field path, so the CLI never shows a traceback.
"""

import copy
import ipaddress
import os
import re
import stat
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import hsplit_sim
from hsplit_sim.data import E2E_DIR_ENV, e2e_file
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.catalog import resolve_device, resolve_link
from hsplit_sim.scenario.models import CONFIG_ONLY, model_config
from hsplit_sim.scenario.schema import REMOTE_WORKER, ClientSpec, Scenario
from hsplit_sim.scenario.traces import bandwidth_steps, online_windows

# Distributions whose versions go into scenario.resolved.yaml.
_VERSIONED = ("torch", "transformers", "peft", "simpy", "pyzmq", "pandas")

# Caps on what a scenario or sweep file may hold, so a mistaken file cannot exhaust the machine: the largest
# shipped file is under 4 KiB and under 300 values; YAML aliases (`*a`) can expand a small file without bound.
MAX_FILE_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 32

# A trained run's clients x rounds: each client-round is real training steps, so more is a mistyped value, not
# an experiment (timing-only runs have no such cap).
MAX_TRAINED_CLIENT_ROUNDS = 10_000_000


def load_scenario(path: str | Path, overrides: list[str] = ()) -> Scenario:
    """Read a scenario file, apply `key.path=value` overrides, validate and check it."""
    path = Path(path)
    return scenario_from_dict(read_mapping(path, "scenario fields"), overrides, relative_to=path.parent)


class _UniqueKeys(yaml.SafeLoader):
    """YAML whose mappings may not repeat a key: with PyYAML's default the last one silently wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's floats: PyYAML (YAML 1.1) reads 1e-3 as the string "1e-3"; a scenario is validated strictly, so
# what looks like a number must be one.
_UniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML as every scenario, sweep and override is read: duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass


def read_mapping(path: Path, what: str = "fields") -> dict:
    """A YAML file whose top level is a mapping; every problem with it is one ScenarioError line."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:  # a NUL in the name
        raise ScenarioError(f"{path!r}: not a valid path") from None
    if not stat.S_ISREG(info.st_mode):
        raise ScenarioError(f"{path}: not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ScenarioError(f"{path}: {info.st_size:,} bytes, above the cap of {MAX_FILE_BYTES >> 20} MiB")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ScenarioError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping of {what}")
    _check_shape(data, str(path))
    return data


def _check_shape(data: Any, where: str) -> None:
    """Refuse data nested deeper than MAX_DEPTH or holding more than MAX_VALUES values once YAML aliases are
    expanded (a cycle expands for ever), before anything walks it recursively."""
    stack, seen = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ScenarioError(f"{where}: more than {MAX_VALUES:,} values (YAML aliases expanded)")
        if depth > MAX_DEPTH:
            raise ScenarioError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def scenario_from_dict(data: dict, overrides: list[str] = (), relative_to: Path | None = None) -> Scenario:
    """Validate a scenario given as plain data (after applying overrides to a copy). Trace files the data names by
    a relative path are found relative_to a folder (the scenario file's), else the working directory, as are
    those overrides name; the scenario keeps absolute paths, so it runs the same from anywhere."""
    data = copy.deepcopy(data)
    absolute_trace_paths(data, relative_to or Path.cwd())
    for override in overrides:
        apply_override(data, override)
    absolute_trace_paths(data, Path.cwd())
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_first_error(e, data)) from None
    _check(scenario)
    return scenario


TRACE_FIELDS = (("system", "availability", "trace"), ("system", "bandwidth_trace"), ("runtime", "key_file"))


def absolute_trace_paths(data: dict, folder: Path) -> None:
    """Make the files a scenario mapping names by relative paths (traces, the key file) absolute, as seen from
    `folder` (the file that names them is there), in place."""
    for *parents, key in TRACE_FIELDS:
        node = data
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = str((folder / node[key]).resolve())


def apply_override(data: dict, override: str) -> None:
    """Set one `key.path=value` in place; the value is parsed as YAML, list items are addressed by index."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ScenarioError(f"--set {override}: expected KEY.PATH=VALUE")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"--set {key}: value is not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise ScenarioError(f"--set {key}: value nested too deeply") from None
    _check_shape(value, f"--set {key}")
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        elif isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ScenarioError(f"--set {key}: {here} is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            parent = ".".join(parts[:depth])
            raise ScenarioError(f"--set {key}: {parent} is {node!r}, not a mapping or list")


def expanded_clients(scenario: Scenario) -> list[ClientSpec]:
    """One ClientSpec per simulated client, groups in order."""
    clients = []
    for group_index, group in enumerate(scenario.clients):
        device = resolve_device(group.device)
        link = resolve_link(group.link)
        budget = group.memory_budget_gb if group.memory_budget_gb is not None else device.memory_gb
        precision = group.precision or scenario.precision
        for _ in range(group.count):
            clients.append(ClientSpec(len(clients), group_index, device, link, budget, group.medium, precision))
    return clients


def server_precision(scenario: Scenario) -> str:
    """The server's number format: its own, else the scenario's."""
    return scenario.server.precision or scenario.precision


def model_hf_config(scenario: Scenario) -> dict:
    """The Hugging Face config dict of the scenario's model."""
    return model_config(scenario.model.name, scenario.model.path)


def resolved_dict(scenario: Scenario) -> dict:
    """The scenario with every default filled and devices and links spelled out, plus package versions."""
    resolved = scenario.model_dump(mode="json")
    resolved["server"]["device"] = resolve_device(scenario.server.device).model_dump(mode="json")
    if scenario.centralised.device is not None:
        resolved["centralised"]["device"] = resolve_device(scenario.centralised.device).model_dump(mode="json")
    for group, raw in zip(scenario.clients, resolved["clients"]):
        device = resolve_device(group.device)
        raw["device"] = device.model_dump(mode="json")
        raw["link"] = resolve_link(group.link).model_dump(mode="json")
        if raw["memory_budget_gb"] is None:
            raw["memory_budget_gb"] = device.memory_gb
    resolved["versions"] = versions()
    return resolved


def versions() -> dict[str, str]:
    """Versions of this package, Python and the main dependencies, read without importing them."""
    found = {"hsplit_sim": hsplit_sim.__version__, "python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _check(scenario: Scenario) -> None:
    """Checks the schema cannot express: they need the model config, the environment or the catalog."""
    config = model_hf_config(scenario)
    gpt2 = config["model_type"] == "gpt2"
    what = scenario.model.name or scenario.model.path

    n_layers = config["n_layer"] if gpt2 else config["num_hidden_layers"]
    split = scenario.algorithm.split_layer
    if not 1 <= split <= n_layers - 1:
        raise ScenarioError(
            f"algorithm.split_layer: {split} is outside 1..{n_layers - 1} ({what} has {n_layers} blocks)"
        )

    widths = _target_widths(config)
    for i, target in enumerate(scenario.algorithm.targets):
        if target not in widths:
            raise ScenarioError(f"algorithm.targets.{i}: {target!r} does not exist in {config['model_type']} models")
    narrowest = min(scenario.algorithm.targets, key=lambda t: widths[t])
    rank = scenario.algorithm.rank
    if rank >= widths[narrowest]:
        raise ScenarioError(
            f"algorithm.rank: {rank} must be below {widths[narrowest]}, the width of the narrowest targeted "
            f"weight ({narrowest}) of {what}"
        )

    all_weights = min(widths.values())
    if max(scenario.algorithm.rank_set) >= all_weights:
        raise ScenarioError(
            f"algorithm.rank_set: {max(scenario.algorithm.rank_set)} must be below {all_weights}, the width of the "
            f"narrowest projection of {what} (HSplitLoRA may adapt any of them)"
        )

    if scenario.model.name in CONFIG_ONLY and not scenario.runtime.timing_only:
        raise ScenarioError(f"model.name: {scenario.model.name} is a config without weights, for timing: run it with "
                            "--timing-only (runtime.timing_only: true)")

    positions = config.get("n_positions", 1024) if gpt2 else config.get("max_position_embeddings", 2048)
    if scenario.data.max_length > positions:
        raise ScenarioError(f"data.max_length: {scenario.data.max_length} exceeds the {positions} positions of {what}")

    if scenario.data.name == "e2e":
        _check_e2e_dir(scenario)

    _check_system(scenario)
    _check_precision(scenario)
    _check_remote_workers(scenario)
    _check_placement(scenario)
    _check_host(scenario)

    n_clients = sum(group.count for group in scenario.clients)
    client_rounds = n_clients * scenario.training.rounds
    if client_rounds > MAX_TRAINED_CLIENT_ROUNDS and not (scenario.runtime.timing_only or scenario.runtime.replay_from):
        raise ScenarioError(
            f"training.rounds: {scenario.training.rounds:,} rounds x {n_clients:,} clients = {client_rounds:,} "
            f"client-rounds of real training, above the cap of {MAX_TRAINED_CLIENT_ROUNDS:,} (timing-only runs have "
            "none: --timing-only)")

    for i, group in enumerate(scenario.clients):
        memory = resolve_device(group.device).memory_gb
        if group.memory_budget_gb is not None and group.memory_budget_gb > memory:
            raise ScenarioError(
                f"clients.{i}.memory_budget_gb: {group.memory_budget_gb:g} GB exceeds the device's {memory:g} GB"
            )


def _check_host(scenario: Scenario) -> None:
    """tcp listens on loopback unless the scenario names another interface and a key file (docs/architecture.md,
    Authentication): every socket is encrypted and authenticated anyway, but nothing listens beyond this machine
    by default or by accident."""
    runtime = scenario.runtime
    if runtime.transport == "tcp" and runtime.key_file is None and not is_loopback(runtime.host):
        raise ScenarioError(f"runtime.host: {runtime.host!r} is not a loopback address; listening there needs "
                            "runtime.key_file too (hsplit-sim keygen FILE)")


def _check_remote_workers(scenario: Scenario) -> None:
    """Workers started by hand (`hsplit-sim worker`) admit only their key file's key, and send their heartbeats to
    the coordinator's tcp socket on runtime.host: the scenario must hold the same key and listen where they reach
    it."""
    runtime = scenario.runtime
    if not runtime.remote_workers:
        return
    for j, endpoint in enumerate(runtime.remote_workers):
        if endpoint in runtime.remote_workers[:j]:
            raise ScenarioError(f"runtime.remote_workers.{j}: {endpoint!r} is listed twice")
    if runtime.client_workers != len(runtime.remote_workers):
        raise ScenarioError(f"runtime.client_workers: {runtime.client_workers}, but runtime.remote_workers lists "
                            f"{len(runtime.remote_workers)}: the remote workers are the client workers (leave "
                            "client_workers out)")
    if runtime.key_file is None:
        raise ScenarioError("runtime.remote_workers: workers started by hand admit only their key file's key; set "
                            "runtime.key_file to a copy of the file their --key names")
    if runtime.transport != "tcp":
        raise ScenarioError(f"runtime.transport: {runtime.transport!r} cannot serve runtime.remote_workers, which "
                            "send heartbeats to this machine: set it to tcp")
    if is_loopback(runtime.host):
        for endpoint in runtime.remote_workers:
            host = REMOTE_WORKER.fullmatch(endpoint).group(1).strip("[]")
            if not is_loopback(host):
                raise ScenarioError(f"runtime.host: {runtime.host!r} is a loopback address, where the worker at "
                                    f"{endpoint} cannot send heartbeats; set it to this machine's address or "
                                    "'0.0.0.0'")


def _check_placement(scenario: Scenario) -> None:
    """Ray actors start their own workers, which the coordinator reaches over tcp (ray_actors.py)."""
    runtime = scenario.runtime
    if runtime.placement == "local":
        if runtime.ray_server_gpus:
            raise ScenarioError("runtime.ray_server_gpus: set for runtime.placement 'ray' only")
        return
    if runtime.remote_workers:
        raise ScenarioError("runtime.placement: 'ray' starts every worker itself; runtime.remote_workers names "
                            "workers started by hand: use one or the other")
    if runtime.transport != "tcp":
        raise ScenarioError(f"runtime.transport: {runtime.transport!r} cannot serve runtime.placement 'ray', whose "
                            "workers are reached over tcp: set it to tcp")


def is_loopback(host: str) -> bool:
    """A loopback address or `localhost`; a name is not resolved, so any other name counts as an interface."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_precision(scenario: Scenario) -> None:
    """Every device computes in its format: a device without it needs its group (or the server) to name another."""
    places = [(f"clients.{i}", group.device, group.precision) for i, group in enumerate(scenario.clients)]
    places.append(("server", scenario.server.device, scenario.server.precision))
    if scenario.centralised.device is not None:  # it trains in the server's format
        places.append(("server", scenario.centralised.device, scenario.server.precision))
    for where, ref, own in places:
        device, precision = resolve_device(ref), own or scenario.precision
        if device.peak_tflops(precision) is None:
            formats = [p for p in ("fp32", "fp16", "bf16") if device.peak_tflops(p) is not None]
            raise ScenarioError(f"{where}.precision: {device.name} has no {precision} rate; set {where}.precision "
                                f"to one it has ({', '.join(formats)})")


def _check_system(scenario: Scenario) -> None:
    """Media that clients name exist, and trace files read (each is read again when a run starts)."""
    system = scenario.system
    media = [m.name for m in system.media]
    if len(set(media)) != len(media):
        raise ScenarioError(f"system.media: two media share a name: {media}")
    for i, group in enumerate(scenario.clients):
        if group.medium is not None and group.medium not in media:
            raise ScenarioError(f"clients.{i}.medium: {group.medium!r} is not a medium of system.media "
                                f"({', '.join(media) or 'none given'})")
    n_clients = sum(group.count for group in scenario.clients)
    if system.availability is not None and system.availability.trace is not None:
        online_windows(system.availability.trace, n_clients)
    if system.bandwidth_trace is not None:
        bandwidth_steps(system.bandwidth_trace, n_clients)
    if system.selection is not None and system.selection.clients_per_round > n_clients:
        raise ScenarioError(f"system.selection.clients_per_round: {system.selection.clients_per_round} is more than "
                            f"the {n_clients} clients")


def _check_e2e_dir(scenario: Scenario) -> None:
    """A directory named by the scenario or the environment must hold the files a run reads (no dir: the copy
    shipped with the package). The environment's choice is written into the scenario, so the resolved file says
    which data a run used."""
    if scenario.data.dir is None:
        scenario.data.dir = os.environ.get(E2E_DIR_ENV) or None
    if scenario.data.dir is None:
        return
    directory = Path(scenario.data.dir)
    if not directory.is_dir():
        raise ScenarioError(f"data.dir: {directory} is not a directory")
    needed = ["devset"] + (["testset_w_refs"] if scenario.data.test_examples else [])
    for stem in needed:
        if e2e_file(directory, stem) is None:
            raise ScenarioError(f"data.dir: {directory} has no {stem}.csv (or {stem}.csv.gz)")


def _target_widths(config: dict) -> dict[str, int]:
    """min(in, out) features of each targeted weight: a LoRA rank must stay below it to be low-rank."""
    if config["model_type"] == "gpt2":
        width = config["n_embd"]
        ffn = min(width, config.get("n_inner") or 4 * width)
        return {"q": width, "k": width, "v": width, "o": width, "up": ffn, "down": ffn}
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    ffn = min(hidden, config["intermediate_size"])
    return {
        "q": min(hidden, heads * head_dim),
        "k": min(hidden, kv_heads * head_dim),
        "v": min(hidden, kv_heads * head_dim),
        "o": min(hidden, heads * head_dim),
        "gate": ffn,
        "up": ffn,
        "down": ffn,
    }


def _first_error(error: ValidationError, data: dict) -> str:
    """The first pydantic error as `field.path: problem`, with the path as the user wrote it."""
    first = error.errors()[0]
    path = _data_path(first["loc"], data) or "scenario"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path += "." + first["ctx"]["discriminator"].strip("'")
    if first["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if first["type"] in ("missing", "union_tag_not_found"):
        return f"{path}: required field is missing"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] != "value_error" and isinstance(value, (str, int, float, bool)):
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as YAML spells it
        message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return f"{path}: {message}"


def _data_path(loc: tuple, data: Any) -> str:
    """Follow a pydantic error location through the input, dropping union tags that are not keys."""
    parts = []
    node = data
    for depth, item in enumerate(loc):
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        elif not (depth == len(loc) - 1 and isinstance(node, dict)):
            continue
        parts.append(str(item))
    return ".".join(parts)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"YAML syntax error: {problem}"
    return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"

