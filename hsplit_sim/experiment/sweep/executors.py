"""Where a sweep's points run: local processes or Ray tasks, behind one interface (submit, wait, cancel).

A point is always the same `python -m hsplit_sim.cli run FILE` command with its output appended to its
point.log; an executor only decides where that command runs and how it is stopped.
"""

import os
import signal
import subprocess

INTERRUPT_GRACE_S = 30


class Executor:
    """Runs point commands. `cores` is what the sweep sizes its parallelism by."""

    cores: int

    def submit(self, argv: list[str], env: dict, log_path: str, cpus: int):
        """Start one point; returns a handle for wait and cancel."""
        raise NotImplementedError

    def wait(self, handle) -> int:
        """Block until the point ends; its exit status."""
        raise NotImplementedError

    def cancel(self, handles: list) -> None:
        """Stop these points (on Ctrl-C or SIGTERM), each run recording itself as interrupted where it can."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Points as child processes, each in a session of its own, so the terminal's Ctrl-C reaches a point only
    through the sweep, once."""

    def __init__(self):
        self.cores = os.cpu_count() or 1

    def submit(self, argv: list[str], env: dict, log_path: str, cpus: int) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)

    def wait(self, handle: subprocess.Popen) -> int:
        return handle.wait()

    def cancel(self, handles: list[subprocess.Popen]) -> None:
        """Pass the interrupt on to each point once, then wait; a point that hangs past the grace is killed."""
        for process in handles:
            process.send_signal(signal.SIGINT)
        for process in handles:
            try:
                process.wait(INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class RayExecutor(Executor):
    """Points as Ray tasks (`--executor ray`, `pip install 'hsplit-sim[ray]'`) that ask for the point's torch
    threads as CPUs, on the cluster RAY_ADDRESS names or a local Ray instance started for the sweep. A point's run
    directory is written where the sweep directory is, so on several machines that must be a shared file system."""

    def __init__(self):
        try:
            import ray
        except ImportError:
            raise RuntimeError("the Ray executor needs Ray: pip install 'hsplit-sim[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.remote_run = ray.remote(_run)
        self.cores = int(ray.cluster_resources().get("CPU", 1))

    def submit(self, argv: list[str], env: dict, log_path: str, cpus: int):
        return self.remote_run.options(num_cpus=cpus).remote(argv, env, log_path)

    def wait(self, handle) -> int:
        return self.ray.get(handle)

    def cancel(self, handles: list) -> None:
        for ref in handles:
            self.ray.cancel(ref, force=True)


def _run(argv: list[str], env: dict, log_path: str) -> int:
    """A point's command, inside a Ray task (on whichever node Ray picked)."""
    with open(log_path, "ab") as log:
        return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env).returncode


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}
