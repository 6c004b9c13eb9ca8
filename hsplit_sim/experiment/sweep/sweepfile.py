"""The sweep file: a base scenario plus axes (`grid`, `zip`, `seeds`), expanded into points, each validated and
named by an id that hashes what it runs."""

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario import apply_override, scenario_from_dict
from hsplit_sim.scenario.load import absolute_trace_paths, read_mapping

SWEEP_KEYS = ("name", "base", "set", "grid", "zip", "seeds", "target_ppl", "reference")

# Points a sweep file may expand to: each is validated up front and run as a process of its own, so more is a
# mistyped axis (ten axes of ten values are 10^10 points), not a study.
MAX_POINTS = 10_000


@dataclass
class Point:
    """One scenario of the sweep: its axis values and the validated scenario data it runs."""

    id: str
    values: dict[str, Any]
    seed: int
    scenario: dict


@dataclass
class Sweep:
    name: str
    file: str
    axes: list[str]
    zip_axes: list[str]
    points: list[Point]
    target_ppl: float | None
    output_dir: str
    overrides: list[str] = field(default_factory=list)
    reference: dict | None = None


def load_sweep_file(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read a sweep file, expand grid x zip x seeds and validate every point; errors name the point."""
    path = Path(path)
    spec = read_mapping(path)
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ScenarioError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(SWEEP_KEYS)})")
    base = _base(path, spec.get("base"))
    for key, value in _axes(path, spec, "set", lists=False).items():
        _set(base, key, value, f"{path}: set")
    for override in overrides:
        apply_override(base, override)

    grid, zipped = _axes(path, spec, "grid"), _axes(path, spec, "zip")
    both = sorted(set(grid) & set(zipped))
    if both:
        raise ScenarioError(f"{path}: {both[0]} is an axis of both grid and zip")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ScenarioError(f"{path}: zip: axes must have equal lengths, got "
                            + ", ".join(f"{k} ({len(v)})" for k, v in zipped.items()))
    seeds = spec.get("seeds")
    if seeds is not None:
        if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
            raise ScenarioError(f"{path}: seeds: expected a non-empty list of non-negative integers")
        if "seed" in grid or "seed" in zipped:
            raise ScenarioError(f"{path}: seeds: give seeds or a seed axis, not both")
    target = spec.get("target_ppl")
    if target is not None and not (isinstance(target, (int, float)) and target > 0):
        raise ScenarioError(f"{path}: target_ppl: expected a positive number")
    algorithms = grid.get("algorithm.name") or zipped.get("algorithm.name") or []
    reference = _reference(path, spec.get("reference"), algorithms)
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ScenarioError(f"{path}: name: {name!r} may hold only letters, digits and . _ -")

    n_points = math.prod(len(v) for v in grid.values()) * (lengths.pop() if lengths else 1) * len(seeds or [None])
    if n_points > MAX_POINTS:
        raise ScenarioError(f"{path}: grid x zip x seeds makes {n_points:,} points, above the cap of {MAX_POINTS:,}")
    grid_combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    zip_combos = [dict(zip(zipped, values)) for values in zip(*zipped.values())] or [{}]
    points, seen = [], {}
    for g, z, seed in itertools.product(grid_combos, zip_combos, seeds or [None]):
        values = {**g, **z}
        data = copy.deepcopy(base)
        described = ", ".join(f"{k}={yaml_text(v)}" for k, v in values.items()) or "base"
        where = f"{path}: point {described}"
        for key, value in values.items():
            if value is None:
                _unset(data, key)
            else:
                _set(data, key, value, where)
        if seed is not None:
            data["seed"] = seed
            values = {**values, "seed": seed}
        try:
            scenario = scenario_from_dict(data, relative_to=path.parent)  # trace files: beside the sweep file
        except ScenarioError as e:
            raise ScenarioError(f"{where}: {e}") from None
        resolved = scenario.model_dump(mode="json")
        point = Point(_point_id(values, resolved), values, scenario.seed, resolved)
        if point.id in seen:
            raise ScenarioError(f"{where}: runs the same scenario as point {seen[point.id]}")
        seen[point.id] = described
        points.append(point)
    axes = list(grid) + list(zipped) + (["seed"] if seeds is not None else [])
    output_dir = points[0].scenario["output"]["dir"]  # the base's: axes that move output.dir are not honoured
    return Sweep(name, str(path), axes, list(zipped), points, float(target) if target else None, output_dir,
                 list(overrides), reference)



def yaml_text(value: Any) -> str:
    """A value as one line of YAML, as a sweep file would write it (strings as they are)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()



def _reference(path: Path, reference: Any, algorithms: list) -> dict | None:
    """Published figures to set beside the measured ones. `speedup` maps each baseline to how many times longer
    than `method` the source says it takes to converge (the report puts the measured ratio of times to target
    beside each); `claims` are statements the source makes that one sweep cannot check alone."""
    if reference is None:
        return None
    where = f"{path}: reference"
    keys = {"source", "method", "speedup", "claims"}
    if not isinstance(reference, dict) or not {"source", "method"} <= set(reference) <= keys \
            or not {"speedup", "claims"} & set(reference):
        raise ScenarioError(f"{where}: expected a mapping with source, method, and speedup or claims (or both)")
    if not isinstance(reference["source"], str) or not reference["source"].strip():
        raise ScenarioError(f"{where}.source: expected text saying where the figures come from")
    speedup = reference.get("speedup", {})
    if not isinstance(speedup, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in speedup.values()):
        raise ScenarioError(f"{where}.speedup: expected a mapping of algorithm names to positive numbers")
    claims = reference.get("claims", [])
    if not isinstance(claims, list) or not all(isinstance(c, str) and c.strip() for c in claims):
        raise ScenarioError(f"{where}.claims: expected a list of statements")
    for name in (reference["method"], *speedup):
        if name not in algorithms:
            raise ScenarioError(f"{where}: {name!r} is not an algorithm.name of the grid "
                                f"({', '.join(map(str, algorithms)) or 'none'})")
    return {"source": reference["source"].strip(), "method": reference["method"],
            "speedup": {str(k): float(v) for k, v in speedup.items()}, "claims": [c.strip() for c in claims]}


def _point_id(values: dict, scenario: dict) -> str:
    """Readable slug of the axis values plus a hash of what the point runs, so a resumed sweep whose base
    changed never mistakes an old result for a new point."""
    what = {k: v for k, v in scenario.items() if k not in ("name", "output")}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:6]
    parts = [("s" if key == "seed" else "") + re.sub(r"[^A-Za-z0-9.]+", ".", yaml_text(v)).strip(".")
             for key, v in values.items()]
    slug = "_".join(p for p in parts if p)[:48] or "base"
    return f"{slug}-{digest}"


def _set(data: dict, key: Any, value: Any, where: str) -> None:
    """Set one key path as `--set` does; the value goes through YAML so both read it the same way."""
    if not isinstance(key, str):
        raise ScenarioError(f"{where}: axis {key!r} must be a key path such as clients.0.count")
    try:
        apply_override(data, f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6)}")
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {str(e).removeprefix('--set ')}") from None


def _unset(data: dict, key: Any) -> None:
    """A null axis value: the point leaves the key out, removed from its scenario where the base, `set:` or
    `--set` gave it, so the schema's default applies. A key that only one algorithm has can so be left off the
    points of the others, which would reject it."""
    *parents, last = str(key).split(".")
    node: Any = data
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _axes(path: Path, spec: dict, section: str, lists: bool = True) -> dict[str, Any]:
    axes = spec.get(section) or {}
    if not isinstance(axes, dict):
        raise ScenarioError(f"{path}: {section}: expected a mapping of key paths to "
                            + ("lists of values" if lists else "values"))
    if lists:
        for key, values in axes.items():
            if not (isinstance(values, list) and values):
                raise ScenarioError(f"{path}: {section}.{key}: expected a non-empty list of values")
    return axes


def _base(path: Path, base: Any) -> dict:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if isinstance(base, str):
        data = read_mapping(path.parent / base)
        absolute_trace_paths(data, (path.parent / base).parent)  # a base file's traces lie beside it
        return data
    raise ScenarioError(f"{path}: base: expected a scenario file path (relative to the sweep file) or a mapping")



