"""The simulated clock: devices, links, the server's accelerators and the event log (SimPy; never torch)."""

from hsplit_sim.sim.engine import Simulation

__all__ = ["Simulation"]
