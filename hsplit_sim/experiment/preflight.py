"""Checks before a run starts, shared by `validate` and `run`: what the workers would otherwise fail on seconds
after they start (weights, data, the torch device, the transport's host, the output dir, the machine's memory),
and whether every device can hold what the algorithm asks of it (the cost model)."""

import csv
import functools
import gzip
import os
import socket
import subprocess
import sys
from pathlib import Path

from hsplit_sim import costs
from hsplit_sim.algorithms import ALGORITHMS
from hsplit_sim.data import e2e_dir, e2e_file
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.sweep.sweepfile import yaml_text
from hsplit_sim.scenario import expanded_clients, model_hf_config, scenario_from_dict
from hsplit_sim.scenario.schema import Scenario
from hsplit_sim.training.data import MIN_TARGET_TOKENS, load_dataset

# What `from_pretrained` loads a checkpoint directory's weights from, and its tokenizer from.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def preflight(scenario: Scenario) -> int:
    """Raise a ScenarioError naming the field of the first check that fails; return how many accelerators one
    copy of the server's state takes."""
    check_environment(scenario)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    algorithm = ALGORITHMS[scenario.algorithm.name]
    return algorithm.check_memory(scenario, spec, expanded_clients(scenario), algorithm.server_device(scenario))


def check_environment(scenario: Scenario) -> None:
    """The checks outside the cost model; a timing-only run or a replay needs only a writable output dir."""
    _check_output_dir(Path(scenario.output.dir))
    runtime = scenario.runtime
    if runtime.timing_only or runtime.replay_from:
        return
    if scenario.model.path is not None:
        _check_checkpoint(Path(scenario.model.path))
    if runtime.placement == "local":  # Ray actors' workers load the model into their nodes' memory
        _check_host_memory(scenario)
    _check_data(scenario)
    if runtime.placement == "ray":  # and use their nodes' devices
        _check_ray()
    elif runtime.torch_device.startswith("cuda"):
        _check_cuda(runtime.torch_device)
    if runtime.transport == "tcp":
        try:
            socket.getaddrinfo(runtime.host, None)
        except (OSError, UnicodeError) as e:
            raise ScenarioError(f"runtime.host: cannot resolve {runtime.host!r} ({e})") from None
    if runtime.key_file is not None:
        coordinator_keys(scenario)


def coordinator_keys(scenario: Scenario):
    """The coordinator's key pair from runtime.key_file (runtime/keys.py), or None when the run makes its own;
    a ScenarioError when the file cannot serve."""
    if scenario.runtime.key_file is None:
        return None
    from hsplit_sim.runtime.keys import KeyFileError, load_key_file  # ZeroMQ only where a key file is named

    try:
        return load_key_file(Path(scenario.runtime.key_file))
    except KeyFileError as e:
        raise ScenarioError(f"runtime.key_file: {e}") from None


def training_examples(scenario: Scenario) -> int:
    """How many training examples the workers partition among the clients (after the checks above)."""
    data = scenario.data
    if data.name == "e2e-synthetic":
        return data.train_examples
    directory = e2e_dir(data.dir)
    files = [e2e_file(directory, stem) for stem in ("devset", "trainset", "testset_w_refs")]
    train, _ = _e2e_sizes(str(directory), tuple((str(p), p.stat().st_mtime_ns) for p in files if p))
    return min(train, data.train_examples or train)


def check_sweep(sweep) -> None:
    """check_environment for every point of a sweep, the error naming the point."""
    for point in sweep.points:
        try:
            check_environment(scenario_from_dict(point.scenario))
        except ScenarioError as e:
            described = ", ".join(f"{k}={yaml_text(v)}" for k, v in point.values.items()) or "base"
            raise ScenarioError(f"{sweep.file}: point {described}: {e}") from None


def _check_output_dir(directory: Path) -> None:
    """The nearest existing folder of output.dir must be a folder this process may create entries in."""
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ScenarioError(f"output.dir: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ScenarioError(f"output.dir: {existing} is not writable")


def _check_checkpoint(path: Path) -> None:
    """What load_model and load_tokenizer read from a checkpoint directory (config.json is checked already)."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ScenarioError(f"model.path: no weights in {path} (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ScenarioError(f"model.path: no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})")


def _check_host_memory(scenario: Scenario) -> None:
    """Every worker process on this machine (the server and each client worker not started by hand elsewhere)
    holds the whole model in fp32: refuse a model that cannot fit this machine's memory that many times, rather
    than swap for minutes and then fail."""
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    per_worker = costs.weights_bytes(spec, 0, spec.n_layers, embeddings=True, head=True)
    workers = 1 + (0 if scenario.runtime.remote_workers else scenario.runtime.client_workers)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if per_worker * workers > available:
        what = scenario.model.name or scenario.model.path
        raise ScenarioError(f"model: {what} takes {per_worker / 1e9:.3g} GB in fp32 in each of {workers} worker "
                            f"processes, {per_worker * workers / 1e9:.3g} GB, more than this machine's "
                            f"{available / 1e9:.3g} GB (fewer runtime.client_workers, a smaller model, or "
                            "--timing-only)")


def _check_data(scenario: Scenario) -> None:
    """What the workers' data loading, encoding and partition need."""
    data = scenario.data
    if data.max_length <= MIN_TARGET_TOKENS:
        raise ScenarioError(f"data.max_length: {data.max_length} leaves no prompt token: a sequence keeps "
                            f"{MIN_TARGET_TOKENS} target tokens, so it needs at least {MIN_TARGET_TOKENS + 1}")
    n_clients = sum(group.count for group in scenario.clients)
    if data.name == "e2e-synthetic":
        for field in ("train_examples", "eval_examples"):
            if getattr(data, field) is None:
                raise ScenarioError(f"data.{field}: e2e-synthetic generates its examples and needs their number")
        available = data.train_examples
    else:
        directory = e2e_dir(data.dir)
        files = [e2e_file(directory, stem) for stem in ("devset", "trainset", "testset_w_refs")]
        for path in files:
            if path is not None:
                _check_columns(path)
        train, evaluation = _e2e_sizes(str(directory), tuple((str(p), p.stat().st_mtime_ns) for p in files if p))
        if not evaluation:
            raise ScenarioError(f"data.dir: {directory} gives no evaluation examples")
        available = min(train, data.train_examples or train)
    if available < n_clients:
        raise ScenarioError(f"data.train_examples: {available} training examples cannot give each of the "
                            f"{n_clients} clients one")


@functools.lru_cache(maxsize=8)
def _e2e_sizes(directory: str, files: tuple) -> tuple[int, int]:
    """Training and validation examples of an E2E directory, read once per version of its files (a sweep's points
    share one)."""
    try:
        train, evaluation = load_dataset("e2e", directory, None, None, 0)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise ScenarioError(f"data.dir: cannot read the E2E files in {directory} ({e})") from None
    return len(train), len(evaluation)


def _check_columns(path: Path) -> None:
    """An E2E CSV is text with the columns mr and ref."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            columns = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise ScenarioError(f"data.dir: cannot read {path} ({e})") from None
    if not {"mr", "ref"} <= set(columns):
        raise ScenarioError(f"data.dir: {path} needs the columns mr and ref")


def _check_ray() -> None:
    try:
        import ray  # noqa: F401 - the run imports it anyway, to place its workers
    except ImportError:
        raise ScenarioError("runtime.placement: 'ray' needs Ray: pip install 'hsplit-sim[ray]'") from None


def _check_cuda(device: str) -> None:
    """Ask torch in a child process: the coordinator does not import torch (the workers do), and this check
    should not cost the run torch's memory."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
        count = int(found.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError):
        raise ScenarioError(f"runtime.torch_device: {device}: could not ask torch for its CUDA devices") from None
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        having = f"{count} CUDA devices" if count else "no CUDA device"
        raise ScenarioError(f"runtime.torch_device: {device} is not available: torch sees {having}")
