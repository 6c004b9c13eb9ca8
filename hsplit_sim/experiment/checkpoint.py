"""Resume of a single run: at each round's end the run saves what it needs to go on, and `hsplit-sim run --resume
RUN_DIR` continues a run that stopped (crashed, failed, interrupted) from its last complete round, writing the
same tables as a run that never stopped.

The checkpoint is one file, RUN_DIR/checkpoint.safetensors, replaced whole after every round (rundir.py:
write_durably), so a kill at any moment leaves the previous round's; a completed run removes it. Its tensors are
each worker's state (training/roles.py: dump_state: adapters, optimiser states, base weights merges changed,
torch's random state) under "<worker>/"; its JSON metadata holds the rest: the rounds table so far, the
simulation at the round barrier (sim/engine.py, sim/fleet.py: clock, server queue, bytes, each client's
factors), the algorithm's round state (plans, importance, what clients missed...), the run's totals and how
many parts each growing table had. Nothing else needs saving: every random draw of the simulation and every
batch is a pure function of the seed, the round and the client, and traces are looked up by simulated time.
safetensors reads tensors and JSON only, never
code, so a checkpoint from elsewhere cannot run anything.
"""

import base64
import dataclasses
import hashlib
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from hsplit_sim.algorithms.base import Planned
from hsplit_sim.algorithms.plans import ClientPlan
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.coordinator import reconcile

FILE = "checkpoint.safetensors"
FORMAT = 2  # 2: the plans and importance tables are parts, no longer round state
# The tables that grow by one part per round (rundir.py), rewound to the checkpoint's round on resume.
PART_TABLES = ("events", "clients", "participation", "energy", "host_times", "plans", "importance")
# What the round state of an algorithm may hold besides JSON's own types, by tag.
_CLASSES = {"ClientPlan": ClientPlan, "Planned": Planned}
# safetensors' names of the dtypes that travel (wire.DTYPES)
_DTYPES = {"bool": "BOOL", "uint8": "U8", "int32": "I32", "int64": "I64", "float16": "F16", "float32": "F32",
           "float64": "F64"}


def encode(value):
    """JSON for the values round state holds: tuples, dicts with keys that are not strings, numpy arrays and the
    dataclasses of _CLASSES become one-key objects tagged "__tuple", "__items", "__array" or "__<class>". An object
    of _CLASSES held in several places (one plan for many clients, one round's aggregation that many clients
    missed) is written once, with a number, and then as {"__ref": number}: decode gives back one object there too.
    So is a frozen one equal to one already written (the plans of ten thousand clients are a few plans): being
    immutable, it may come back shared."""
    numbers: dict[int, int] = {}  # by identity
    equal: dict[tuple, int] = {}  # frozen ones, by value
    written: list = []  # in the order numbered (held, so that no id is reused while encoding)

    classes = tuple(_CLASSES.values())

    def walk(value):
        if value is None or type(value) in (bool, int, float, str):  # most of what a state holds, first
            return value
        if type(value) in classes:
            if id(value) in numbers:
                return {"__ref": numbers[id(value)]}
            key = (type(value), repr(value)) if type(value).__dataclass_params__.frozen else None
            if key in equal:
                numbers[id(value)] = equal[key]
                return {"__ref": equal[key]}
            number = numbers[id(value)] = len(written)
            written.append(value)
            if key is not None:
                equal[key] = number
            return {f"__{type(value).__name__}": {"ref": number, "fields": {
                f.name: walk(getattr(value, f.name)) for f in dataclasses.fields(value)}}}
        if isinstance(value, tuple):
            return {"__tuple": [walk(v) for v in value]}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v) for k, v in value.items()}
            return {"__items": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, np.ndarray):  # HSplitLoRA's global adapter without NAA
            return {"__array": {"dtype": value.dtype.name, "shape": list(value.shape),
                                "data": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (bool, int, float, str)):  # their subclasses
            return value
        raise TypeError(f"checkpoint: cannot save a {type(value).__name__}")

    return walk(value)


def decode(value):
    """The values encode wrote (its objects in the order it numbered them)."""
    shared: dict[int, object] = {}

    def walk(value):
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "__tuple":
                return tuple(walk(v) for v in inner)
            if tag == "__items":
                return {walk(k): walk(v) for k, v in inner}
            if tag == "__ref":
                return shared[inner]
            if tag == "__array":
                return np.frombuffer(base64.b64decode(inner["data"]), dtype=inner["dtype"]).reshape(inner["shape"])
            if tag.startswith("__") and tag[2:] in _CLASSES:
                made = _CLASSES[tag[2:]](**{k: walk(v) for k, v in inner["fields"].items()})
                shared[inner["ref"]] = made
                return made
        return {k: walk(v) for k, v in value.items()}

    return walk(value)


def scenario_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "scenario.resolved.yaml").read_bytes()).hexdigest()


def save_checkpoint(writer, round_index: int, run: dict, worker_states: Callable) -> None:
    """The checkpoint of the end of round `round_index`: `run` (the run's JSON state) and the workers' states,
    which `worker_states(put)` (Backend.state) hands over array by array as their pages arrive and whose JSON parts
    it returns. Each array goes to a scratch file at once, so the coordinator holds one page, not every client's
    adapter and moments (5.3 MiB a SmolLM2-135M client at rank 8 on q and v); the file is then that data behind
    its header (safetensors has no writer that takes tensors one at a time)."""
    with tempfile.TemporaryFile(dir=writer.path) as data:
        entries: dict[str, dict] = {}

        def put(worker: str, name: str, array: np.ndarray) -> None:
            array = np.asarray(array, order="C")  # ascontiguousarray would make a 0-d array (a step count) 1-d
            start = data.tell()
            data.write(array.reshape(-1).view(np.uint8))
            entries[f"{worker}/{name}"] = {"dtype": _DTYPES[array.dtype.name], "shape": list(array.shape),
                                           "data_offsets": [start, data.tell()]}

        headers = worker_states(put)
        meta = {"format": FORMAT, "round": round_index, **run, "workers": headers}
        writer.write_durably(FILE, lambda path: _write_safetensors(path, entries, {"checkpoint": json.dumps(
            encode(meta))}, data))


def _write_safetensors(path: Path, entries: dict[str, dict], metadata: dict[str, str], data) -> None:
    """A safetensors file of the tensors `entries` describe, their bytes in the file `data` at the offsets given:
    the header's length (8 bytes, little-endian), the header (JSON, padded with spaces to 8 bytes), the data."""
    header = json.dumps({**entries, "__metadata__": metadata}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        data.seek(0)
        shutil.copyfileobj(data, out, 1 << 20)


def load_checkpoint(run_dir: Path) -> tuple[dict, dict[str, tuple[dict, dict]]]:
    """(the run's state, the workers' states) of a run directory's checkpoint."""
    try:
        with safe_open(run_dir / FILE, framework="np") as stored:
            meta = decode(json.loads((stored.metadata() or {})["checkpoint"]))
            if meta.get("format") != FORMAT:
                raise ScenarioError(f"--resume: {run_dir / FILE} is of checkpoint format {meta.get('format')}, "
                                    f"this version reads {FORMAT}")
            workers = {name: (header, {}) for name, header in meta.pop("workers").items()}
            for key in stored.keys():
                worker, name = key.split("/", 1)
                workers[worker][1][name] = stored.get_tensor(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise ScenarioError(f"--resume: {run_dir / FILE} cannot be read ({type(exc).__name__}: {exc})") from None
    return meta, workers


def resumable(run_dir: str | Path):
    """(scenario, summary, run state, worker states) of a run directory that can resume; a one-line
    ScenarioError for one that cannot: not a run directory, complete, still running, not trained or timing-only,
    without a checkpoint, or whose scenario or training key changed since the checkpoint."""
    from hsplit_sim.experiment.trajectory import training_key
    from hsplit_sim.scenario import scenario_from_dict
    from hsplit_sim.scenario.load import read_mapping

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file() or not (run_dir / "scenario.resolved.yaml").is_file():
        raise ScenarioError(f"--resume: {run_dir} is not a run directory (no summary.json and "
                            "scenario.resolved.yaml)")
    summary = reconcile(run_dir)  # a run whose coordinator died is marked crashed
    if summary is None:
        raise ScenarioError(f"--resume: {run_dir}/summary.json cannot be read")
    status = summary.get("status")
    if status == "completed":
        raise ScenarioError(f"--resume: {run_dir} is complete: there is nothing to continue")
    if status == "running":
        coordinator = summary.get("coordinator") or {}
        raise ScenarioError(f"--resume: {run_dir} is still running (coordinator pid {coordinator.get('pid')} on "
                            f"{coordinator.get('host')})")
    if summary.get("trajectory") not in ("trained", "timing-only"):
        raise ScenarioError(f"--resume: {run_dir} is a {summary.get('trajectory')} run: it takes seconds, so run it "
                            "again rather than resume it")
    if not (run_dir / FILE).is_file():
        raise ScenarioError(f"--resume: {run_dir} has no checkpoint ({FILE}): it stopped before its first round "
                            "ended, or was made by a version without resume; run its scenario again")
    run, workers = load_checkpoint(run_dir)
    if run["scenario_sha256"] != scenario_digest(run_dir):
        raise ScenarioError(f"--resume: {run_dir}/scenario.resolved.yaml changed since the checkpoint: the run "
                            "would not go on as it started")
    resolved = read_mapping(run_dir / "scenario.resolved.yaml")
    resolved.pop("versions", None)
    scenario = scenario_from_dict(resolved)
    key = training_key(scenario)
    if key != run["training_key"] or key != summary.get("training_key"):
        raise ScenarioError(f"--resume: {run_dir} trained under training key {run['training_key']}, this version's "
                            f"is {key}: the code now trains differently from the same inputs, so the run cannot "
                            "go on; run its scenario again")
    return scenario, summary, run, workers
