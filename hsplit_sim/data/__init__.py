"""Data that ships inside the package, so a clone or a pip install needs nothing beside it.

`e2e/` holds the E2E development and test splits (CC BY-SA 4.0; attribution in `e2e/README.md`). A scenario's
`data.dir` or the environment variable HSPLIT_SIM_E2E_DIR points at another copy, such as the full release with
its training split.
"""

import os
from pathlib import Path

E2E_DIR_ENV = "HSPLIT_SIM_E2E_DIR"
BUNDLED_E2E_DIR = Path(__file__).parent / "e2e"
# The files a directory of E2E data must hold (plain CSV or gzip-compressed); trainset is optional.
E2E_REQUIRED = ("devset", "testset_w_refs")


def e2e_dir(configured: str | None) -> Path:
    """The E2E directory: the scenario's, else the environment's, else the copy shipped with the package."""
    if configured:
        return Path(configured)
    if os.environ.get(E2E_DIR_ENV):
        return Path(os.environ[E2E_DIR_ENV])
    return BUNDLED_E2E_DIR


def e2e_file(directory: Path, stem: str) -> Path | None:
    """`stem.csv`, else `stem.csv.gz`, in directory; None when neither is there."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (directory / name).is_file():
            return directory / name
    return None
