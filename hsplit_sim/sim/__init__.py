"""The simulated clock and fleet: devices, links, the server's accelerators, their system effects and the event
log (SimPy; never torch)."""

from hsplit_sim.sim.engine import Simulation
from hsplit_sim.sim.fleet import Fleet

__all__ = ["Fleet", "Simulation"]
