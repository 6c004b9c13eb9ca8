"""Sweep points on a Ray cluster (`hsplit-sim sweep --executor ray`, `pip install hsplit-sim[ray]`).

A point is the same `hsplit-sim run` command the local executor starts, run by a Ray task that asks for
the point's torch threads as CPUs. Its run directory is written where the sweep directory is, so on a
multi-machine cluster that directory must be on a file system every node shares. The cluster is the one
RAY_ADDRESS names, or a local Ray instance started for the sweep.
"""

import os
import subprocess

try:
    import ray
except ImportError:  # the extra is optional; start() says how to get it
    ray = None

_remote_run = None


def start() -> int:
    """Connect to (or start) Ray; returns the cluster's CPU count."""
    if ray is None:
        raise RuntimeError("the Ray executor needs Ray: pip install 'hsplit-sim[ray]'")
    global _remote_run
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    _remote_run = ray.remote(_run)
    return int(ray.cluster_resources().get("CPU", 1))


def _run(argv: list[str], env: dict, log_path: str) -> int:
    with open(log_path, "ab") as log:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env).returncode


def submit(argv: list[str], env: dict, log_path: str, cpus: int):
    """Start one point on the cluster; ray.get(ref) is its exit status."""
    return _remote_run.options(num_cpus=cpus).remote(argv, env, log_path)


def wait(ref) -> int:
    return ray.get(ref)


def cancel(ref) -> None:
    ray.cancel(ref, force=True)
