"""Mutated shipped scenarios and sweep files: `hsplit-sim validate` answers 0, or 2 with one `error:` line, never a
traceback or a hang (#13). Derandomized, so CI sees the same cases every time."""

import contextlib
import copy
import io
import math
import signal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsplit_sim.cli import main
from hsplit_sim.scenario.examples import EXAMPLES_DIR, copy_examples

# Each shipped file parsed once: {relative path: data}, by kind.
PARSED = {p.relative_to(EXAMPLES_DIR).as_posix(): yaml.safe_load(p.read_text()) for p in EXAMPLES_DIR.rglob("*.yaml")}
FILES = {kind: sorted(name for name, data in PARSED.items() if ("base" in data) == (kind == "sweep"))
         for kind in ("scenario", "sweep")}
EDGE_VALUES = [-1, 0, 1, 2**31, 2**64, -(2**63), 10**30, 1e308, -1e-300, math.inf, -math.inf, math.nan, True, False,
               None, "", "text", "x" * 10_000, "a\x00b", "/dev/zero", "/", "..", "ünïcödé", "1e3", "-1", [], [1, 2],
               [None], ["q", "q"], {}, {"name": "x"}, {"a": {"b": {"c": [1, {"d": None}]}}}]
CASES_PER_FILE_KIND = 700
SECONDS_PER_CASE = 20


@pytest.fixture(scope="module")
def examples_copy(tmp_path_factory) -> Path:
    """The shipped examples, copied, so a mutated file lies where its traces and base are."""
    folder = tmp_path_factory.mktemp("examples")
    copy_examples(folder)
    return folder


def _paths(node, prefix=()):
    """Every key path of a nested mapping and list, the root's keys first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _parent(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated(draw, kind: str):
    """(relative path, YAML text) of one shipped file of the kind, with one to three mutations."""
    name = draw(st.sampled_from(FILES[kind]))
    data = copy.deepcopy(PARSED[name])
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "unknown", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(EDGE_VALUES)))
        elif action == "delete":
            del parent[path[-1]]
        elif action == "unknown" and isinstance(parent, dict):
            parent["no_such_key"] = copy.deepcopy(draw(st.sampled_from(EDGE_VALUES)))
        elif action == "duplicate" and isinstance(parent, dict):
            duplicate = path[-1]
    text = yaml.safe_dump(data, sort_keys=False, width=10**6, allow_unicode=True)
    if duplicate is not None:  # the first line that sets the key, written twice
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().lstrip("- ").startswith(f"{duplicate}:"):
                indent = len(line) - len(line.lstrip())
                lines.insert(i + 1, " " * indent + line.lstrip().lstrip("- "))
                break
        text = "\n".join(lines) + "\n"
    return name, text


def _alarm(signum, frame):
    raise TimeoutError(f"validate ran past {SECONDS_PER_CASE} s")


def _validate(folder: Path, case) -> None:
    name, text = case
    path = folder / Path(name).parent / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["validate", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = err.getvalue().splitlines()
    assert code in (0, 2), (code, err.getvalue(), text)
    if code == 0:
        assert lines == [] and out.getvalue().endswith("ok\n"), (err.getvalue(), text)
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), (err.getvalue(), text)


@pytest.mark.parametrize("kind", ["scenario", "sweep"])
def test_validate_answers_mutated_examples_in_one_line(kind, examples_copy, monkeypatch):
    monkeypatch.chdir(examples_copy)  # output.dir "runs" is checked here, never created

    @settings(max_examples=CASES_PER_FILE_KIND, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(kind))
    def check(case):
        _validate(examples_copy, case)

    check()
