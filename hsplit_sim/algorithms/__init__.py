"""How clients are configured and aggregated: one module per algorithm, each registering itself by name.

An algorithm module holds one class: its family's protocol (protocols/) filled in with the algorithm's
decisions, and its `Config`, which joins the scenario schema under its name. Adding an algorithm is a module
and its import here; docs/algorithms.md shows one.
"""

from hsplit_sim.algorithms import (  # noqa: F401
    cenlora,
    fedlora,
    flexlora,
    flora,
    ft,
    hetlora,
    hsplitlora,
    splitlora,
)
from hsplit_sim.algorithms.base import Algorithm, RunContext
from hsplit_sim.algorithms.registry import ALGORITHMS, register

__all__ = ["ALGORITHMS", "Algorithm", "RunContext", "register"]
