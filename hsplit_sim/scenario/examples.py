"""The example scenarios and sweeps that ship inside the package (the repository's `scenarios/` folder).

`hsplit-sim run quickstart` and `hsplit-sim sweep whatif/bandwidth` name them without a path, so an installed
package runs its examples from any directory; `hsplit-sim examples --copy DIR` writes them out for editing.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from hsplit_sim.errors import ScenarioError

# In a checkout this is a link to the repository's scenarios/; in a wheel, the folder itself.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class Example:
    name: str  # path below the examples folder, without .yaml: "quickstart", "whatif/bandwidth"
    kind: str  # "scenario" or "sweep"
    description: str
    path: Path


def examples() -> list[Example]:
    """Every shipped scenario and sweep file, top level first, then by folder and name."""
    files = sorted(EXAMPLES_DIR.rglob("*.yaml"), key=lambda p: (len(p.relative_to(EXAMPLES_DIR).parts), p))
    return [_example(path) for path in files]


def _example(path: Path) -> Example:
    text = path.read_text(encoding="utf-8")
    kind = "sweep" if "base" in (yaml.safe_load(text) or {}) else "scenario"
    return Example(path.relative_to(EXAMPLES_DIR).with_suffix("").as_posix(), kind, _description(text), path)


def _description(text: str) -> str:
    """The first sentence of the file's leading comment (command lines left out)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        line = line.lstrip("#").strip()
        if not line.startswith("hsplit-sim "):
            lines.append(line)
    joined = " ".join(lines)
    end = joined.find(". ")
    return joined if end < 0 else joined[: end + 1]


def scenario_path(argument: str) -> Path:
    """A file the user named, else the shipped example of that name (`quickstart`, `paper/tiny-heterogeneous`)."""
    path = Path(argument)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    example = EXAMPLES_DIR / f"{argument}.yaml"
    if not example.is_file():
        raise ScenarioError(f"{argument}: no such file, and no example of that name (list them: hsplit-sim examples)")
    return example


def copy_examples(destination: str | Path) -> list[Path]:
    """Write every example file (with the folders' READMEs and the traces they name) below destination; never
    overwrites a file."""
    destination = Path(destination)
    sources = sorted(p for p in EXAMPLES_DIR.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", ".csv"))
    targets = [destination / p.relative_to(EXAMPLES_DIR) for p in sources]
    existing = [t for t in targets if t.exists()]
    if existing:
        raise ScenarioError(f"{destination}: {existing[0].relative_to(destination)} exists already; "
                            "copy into an empty or new folder")
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return targets
