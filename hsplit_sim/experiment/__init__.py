"""Runs and sweeps: where a scenario meets the simulator, the workers and the run directory."""
