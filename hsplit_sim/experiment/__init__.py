"""Runs (and later sweeps): where a scenario meets the simulator, the workers and the run directory."""
