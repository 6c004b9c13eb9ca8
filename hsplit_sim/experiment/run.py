"""`hsplit-sim run`: one scenario, end to end, into a run directory."""

import contextlib
import gc
import logging
from collections import Counter
from dataclasses import dataclass, field
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from hsplit_sim import costs
from hsplit_sim.algorithms import ALGORITHMS, RunContext
from hsplit_sim.algorithms.base import RoundStats
from hsplit_sim.backends import TimingBackend
from hsplit_sim.backends.real import RealBackend
from hsplit_sim.backends.replay import ProjectionBackend, ReplayBackend, ReplayMismatch
from hsplit_sim.errors import RunError
from hsplit_sim.experiment import checkpoint
from hsplit_sim.experiment.coordinator import identity, reconcile
from hsplit_sim.experiment.preflight import coordinator_keys, preflight, training_examples
from hsplit_sim.experiment.progress import ProgressLine
from hsplit_sim.experiment.rundir import RunWriter, WriteError
from hsplit_sim.experiment.trajectory import timing_partition_sizes, training_key
from hsplit_sim.results import RESULTS_VERSION
from hsplit_sim.runtime.launcher import WorkerPool
from hsplit_sim.runtime.wire import MAX_HEADER_BYTES
from hsplit_sim.scenario import expanded_clients, model_hf_config, resolved_dict, server_precision
from hsplit_sim.scenario.schema import Scenario
from hsplit_sim.sim import Fleet, Simulation
from hsplit_sim.sim.energy import round_energy

log = logging.getLogger("hsplit_sim")


def worker_init_args(scenario: Scenario, role: str, n_clients: int) -> dict:
    """What a worker needs to load the same model, data and partition as every other worker."""
    return {"role": role, "seed": scenario.seed, "torch_device": scenario.runtime.torch_device,
            "n_clients": n_clients, "model": scenario.model.model_dump(), "data": scenario.data.model_dump()}


def frame_limit(scenario: Scenario, spec: costs.ModelSpec, n_clients: int) -> int:
    """The largest frame a worker or the coordinator accepts (ZMQ_MAXMSGSIZE, less CurveZMQ's framing): a quarter
    above the run's largest legitimate frame, the larger of the cost model's largest tensor
    (costs.largest_frame_bytes), the checkpoint's (a projection's base weight a merge changed; under full
    fine-tuning any weight or its Adam moment, the embedding the largest) and the JSON header cap
    (wire.MAX_HEADER_BYTES). A sender checks its frames against it too, so a frame the derivation missed fails
    loudly instead of being dropped unread."""
    algorithm = scenario.algorithm
    largest = costs.largest_frame_bytes(spec, scenario.training.batch_size, scenario.data.max_length,
                                        max(algorithm.rank, *algorithm.rank_set), n_clients,
                                        training_examples(scenario))
    weights = [costs.module_shape(spec, m) for m in set(costs.TARGET_MODULES[spec.family].values())]
    if getattr(ALGORITHMS[algorithm.name], "full_finetune", False):
        weights.append((spec.vocab_size, spec.d_model))
    state = max(d_in * d_out for d_in, d_out in weights) * costs.FP32
    return max(largest, state, MAX_HEADER_BYTES) * 5 // 4


def start_workers(pool: WorkerPool, scenario: Scenario, n_clients: int) -> list[np.ndarray]:
    """Initialise every worker at once (model loading dominates) and check that they agree on the data."""
    pending = [(c, c.send("init", args={**worker_init_args(scenario, "server" if c is pool.server else "clients",
                                                            n_clients), **pool.init_args(c)}))
               for c in pool.connections.values()]
    replies = [c.reply("init", request_id) for c, request_id in pending]
    partitions = [np.array(replies[0].tensors[f"partition.{k}"]) for k in range(n_clients)]
    for (connection, _), reply in zip(pending[1:], replies[1:]):
        if reply.header["result"]["partition_sizes"] != replies[0].header["result"]["partition_sizes"]:
            raise RunError(f"worker {connection.name} built a different data partition than the server")
    return partitions


def run_scenario(scenario: Scenario, progress: bool = True):
    """Run one scenario; returns the run directory. Finished rounds stay on disk whatever happens. Figures are
    the caller's (`hsplit-sim run` draws them): a run writes tables only.

    The backend is chosen here, once: real workers; runtime.timing_only runs the same SimPy processes without
    workers (costs and bytes from the cost model, accuracy columns NaN); runtime.replay_from re-times a trained
    run of the same training key (trajectory.py, backends/replay.py).
    """
    replay = None
    if scenario.runtime.replay_from:
        reconcile(scenario.runtime.replay_from)  # a trained run whose coordinator died is refused as crashed
        replay = ReplayBackend(scenario.runtime.replay_from, training_key(scenario))
    try:
        return _run_scenario(scenario, progress, replay)
    except ReplayMismatch as mismatch:
        if scenario.runtime.replay_fallback != "train":
            raise
        log.warning("%s; training anew", mismatch)
        if mismatch.run_dir is not None:
            shutil.rmtree(mismatch.run_dir, ignore_errors=True)
        runtime = scenario.runtime.model_copy(update={"timing_only": False, "replay_from": None})
        return _run_scenario(scenario.model_copy(update={"runtime": runtime}), progress, None,
                             {"replay_rejected": str(mismatch)})


def project_run(trained_dir, scenario: Scenario, progress: bool = True):
    """A run directory marked `projected`: the trained run's accuracy round by round beside the per-round times
    of the same algorithm under `scenario` (its system and model), which runs timing-only
    (backends/replay.py: ProjectionBackend, and the assumption it carries)."""
    reconcile(trained_dir)
    projection = ProjectionBackend(trained_dir, scenario.algorithm.name, scenario.training.rounds)
    runtime = scenario.runtime.model_copy(update={"timing_only": True, "replay_from": None})
    return _run_scenario(scenario.model_copy(update={"runtime": runtime}), progress, projection,
                         {"projection_differs_in": projection.differences(resolved_dict(scenario))})


def resume_run(run_dir, progress: bool = True):
    """Continue a run that stopped from the checkpoint of its last complete round, in its own directory
    (experiment/checkpoint.py); a run directory that cannot resume is one ScenarioError line."""
    scenario, summary, run, workers = checkpoint.resumable(run_dir)
    return _run_scenario(scenario, progress, None, resumed=_Resumed(Path(run_dir), summary, run, workers))


@dataclass
class _Resumed:
    """A stopped run and its checkpoint (checkpoint.resumable)."""

    path: Path
    summary: dict
    run: dict
    workers: dict


def _run_scenario(scenario: Scenario, progress: bool, replay: ReplayBackend | ProjectionBackend | None,
                  note: dict | None = None, resumed: _Resumed | None = None):
    per_copy = preflight(scenario)
    algorithm = ALGORITHMS[scenario.algorithm.name]
    accelerators = algorithm.server_accelerators(scenario)
    copies = accelerators // per_copy
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    clients = expanded_clients(scenario)
    timing_only = scenario.runtime.timing_only or replay is not None
    if resumed:
        writer = RunWriter(resumed.path)
        for name in checkpoint.PART_TABLES:
            writer.rewind(name, resumed.run["parts"].get(name, 0), resumed.run["round"])
    else:
        writer = RunWriter.create(scenario.output.dir, scenario.name)
        writer.write_resolved(resolved_dict(scenario))
    handler = _RunLog(writer.path / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    rounds: list[dict] = resumed.run["rows"] if resumed else []
    # wall_time_s goes on from where the stopped run left it
    started = time.monotonic() - (rounds[-1]["wall_time_s"] if rounds else 0.0)
    if resumed:
        summary = dict(resumed.summary, status="running", error=None, coordinator=identity(),
                       resumed=[*resumed.summary.get("resumed", []), {
                           "from_round": resumed.run["round"], "at": datetime.now(timezone.utc).isoformat()}])
        log.info("resuming %s after round %d", writer.path, resumed.run["round"])
    else:
        summary = {"name": scenario.name, "algorithm": scenario.algorithm.name, "status": "running", "error": None,
                   "run_dir": str(writer.path), "started_at": datetime.now(timezone.utc).isoformat(),
                   "coordinator": identity(),
                   "n_clients": len(clients), "rounds_planned": scenario.training.rounds,
                   "timing_only": timing_only, "training_key": training_key(scenario),
                   "precision": {"server": server_precision(scenario),
                                 "clients": sorted({c.precision for c in clients})},
                   "server_placement": {"accelerators": accelerators, "accelerators_per_copy": per_copy,
                                        "copies": copies},
                   "trajectory": replay.trajectory if replay else "timing-only" if timing_only else "trained",
                   "replayed_from": str(replay.run_dir) if replay else None, "results_version": RESULTS_VERSION,
                   **(note or {})}
    writer.write_summary(summary)
    sim = Simulation(copies, resumed.run["simulation"]["now"] if resumed else 0.0)
    fleet = Fleet(sim, clients, algorithm.server_device(scenario), accelerators,
                  scenario.system, scenario.seed, server_precision(scenario))
    writer.write_table("resources", fleet.resources())
    stats = RoundStats()
    totals = RunTotals(**resumed.run["totals"]) if resumed else RunTotals()
    first = resumed.run["round"] + 1 if resumed else 0
    try:
        with contextlib.ExitStack() as stack:
            progress_line = stack.enter_context(ProgressLine(f"{scenario.name}: round", scenario.training.rounds,
                                                             enabled=progress))
            if timing_only:
                backend = replay or TimingBackend()
                partition_sizes = timing_partition_sizes(scenario, len(clients))
            else:
                pool = stack.enter_context(WorkerPool(
                    scenario.runtime.client_workers, scenario.runtime.transport, scenario.runtime.host,
                    writer.path / "log.txt", scenario.runtime.request_timeout_s,
                    frame_limit(scenario, spec, len(clients)), coordinator_keys(scenario),
                    remote_workers=scenario.runtime.remote_workers, placement=scenario.runtime.placement,
                    server_gpus=scenario.runtime.ray_server_gpus))
                log.info("workers started: %s", pool.pids())
                partitions = start_workers(pool, scenario, len(clients))
                backend = RealBackend(scenario, pool.server, pool.client_workers, partitions, stats,
                                      overlap_split=pool.own_cores)
                partition_sizes = [len(p) for p in partitions]
            ctx = RunContext(scenario, spec, clients, fleet, backend, partition_sizes, stats)
            algorithm = ALGORITHMS[scenario.algorithm.name](ctx)
            algorithm.setup()
            if algorithm.order_sensitive:
                fleet.server_steps_in_turn()
            saver = _Checkpoints(writer, ctx, algorithm, rounds, totals, summary["training_key"])
            if resumed:
                saver.restore(resumed.run, resumed.workers)
            simulated = time.monotonic()
            sim.run(_rounds(ctx, algorithm, writer, rounds, started, progress_line, totals, first, saver))
            summary["simulation_wall_s"] = time.monotonic() - simulated
            tables, fields = backend.outputs(algorithm.eval_adapters())
            for name, table in tables.items():
                writer.write_table(name, table)
            summary.update(fields)
        summary["status"] = "completed"
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user")
        raise
    except ReplayMismatch as exc:
        summary.update(status="failed", error=str(exc))
        exc.run_dir = writer.path
        raise
    except WriteError as exc:
        message = f"{exc}; {_kept(rounds)}"
        summary.update(status="failed", error=message)
        log.error("run failed: %s", message)
        raise WriteError(message) from None
    except Exception as exc:
        summary.update(status="failed", error=str(exc))
        log.exception("run failed")
        raise
    finally:
        closing = _close(writer, sim, summary, rounds, started, totals, algorithm.further_tables)
        log.info("run %s: %s", summary["status"], writer.path)
        log.removeHandler(handler)
        handler.close()
    if closing is not None:
        raise WriteError(f"{closing}; {_kept(rounds)}")
    return writer.path


class _RunLog(logging.FileHandler):
    """log.txt: a record that cannot be written (a full disk) is dropped, not printed with a traceback beside
    the run's one error line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _close(writer: RunWriter, sim: Simulation, summary: dict, rounds: list[dict], started: float,
           totals: "RunTotals", further_tables: tuple[str, ...]) -> WriteError | None:
    """Combine the parts and write summary.json, whatever ended the run. A write that fails leaves the parts
    (which analysis reads) and marks the run failed; its error is returned, to be raised once nothing else is.
    A further table of the method that got no row (importance, timing-only) is written empty once a round is."""
    error = None
    try:
        writer.append_events(*sim.take_events())
        writer.finish_events()
        for name in checkpoint.PART_TABLES:
            if name != "events":
                writer.finish_parts(name)
        for name in further_tables:
            if rounds and not (writer.path / f"{name}.parquet").exists():
                writer.write_table(name, [])
    except WriteError as exc:
        error = exc
        if summary["status"] == "completed":
            summary.update(status="failed", error=str(exc))
    writer.close()
    summary["events"] = sim.n_events
    summary["simpy_events"] = _simpy_events(sim)
    _finish(summary, rounds, started, totals)
    try:
        writer.write_summary(summary)
    except WriteError as exc:
        error = error or exc
    if summary["status"] == "completed":  # after the summary says so: a complete run cannot resume
        with contextlib.suppress(OSError):  # and a checkpoint left behind only takes space
            (writer.path / checkpoint.FILE).unlink(missing_ok=True)
    return error


def _kept(rounds: list[dict]) -> str:
    return f"the rounds table keeps rounds 0..{rounds[-1]['round']}" if rounds else "no round was written"


def _simpy_events(sim: Simulation) -> int | None:
    """Events SimPy scheduled (its event-id counter: timeouts, requests, releases, process starts and ends)."""
    counter = getattr(sim.env, "_eid", None)
    return next(counter) if counter is not None else None


@dataclass
class RunTotals:
    """What summary.json adds up over the rounds besides the rounds table: energy and who took part."""

    energy_j: float | None = None  # None: no device has power figures
    outcomes: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.outcomes = Counter(self.outcomes)  # from a checkpoint's JSON


class _Checkpoints:
    """The run's state at the end of every output.checkpoint_every-th round, saved into the run directory, and
    put back on resume (checkpoint.py says what it holds)."""

    def __init__(self, writer: RunWriter, ctx: RunContext, algorithm, rows: list[dict], totals: RunTotals,
                 key: str):
        self.writer, self.ctx, self.algorithm, self.rows, self.totals, self.key = (writer, ctx, algorithm, rows,
                                                                                   totals, key)
        self.digest = checkpoint.scenario_digest(writer.path)

    def save(self, round_index: int) -> None:
        every = self.ctx.scenario.output.checkpoint_every
        if every == 0 or round_index % every:
            return
        fleet = self.ctx.fleet
        run = {"training_key": self.key, "scenario_sha256": self.digest, "rows": self.rows,
               "totals": {"energy_j": self.totals.energy_j, "outcomes": dict(self.totals.outcomes)},
               "parts": {name: self.writer.parts.get(name, 0) for name in checkpoint.PART_TABLES},
               "simulation": fleet.sim.state(), "fleet": fleet.state(), "algorithm": self.algorithm.state()}
        checkpoint.save_checkpoint(self.writer, round_index, run, self.ctx.backend.state)

    def restore(self, run: dict, workers: dict) -> None:
        """After the algorithm's setup: the checkpoint's state over what setup made, and the rounds table as it
        stood then."""
        fleet = self.ctx.fleet
        fleet.sim.restore(run["simulation"])
        fleet.restore(run["fleet"])
        self.algorithm.restore(run["algorithm"])
        self.ctx.backend.restore(workers)
        if self.rows:
            self.writer.write_rounds(self.rows)


def _rounds(ctx: RunContext, algorithm, writer: RunWriter, rows: list[dict], started: float, progress: ProgressLine,
            totals: RunTotals, first: int, saver: _Checkpoints):
    """The run as one SimPy process: evaluate, then rounds from `first` (0, or the round after a checkpoint),
    writing every table after each round (the growing ones as one more part each, the rounds table rewritten
    whole), and then the checkpoint."""
    training, fleet, sim = ctx.scenario.training, ctx.fleet, ctx.fleet.sim
    for round_index in range(first, training.rounds + 1):
        ctx.stats.losses, ctx.stats.agg_error = [], float("nan")
        clients = algorithm.client_rows(round_index)  # before the round: the plans it trains with
        started_s = sim.now
        if round_index > 0 or algorithm.prepares:
            yield sim.env.process(algorithm.round(round_index) if round_index > 0 else algorithm.prepare())
            ctx.backend.settle()
            participation = fleet.take_participation()
            energy = round_energy(round_index, {node.index: node.take_busy() for node in fleet.clients}, ctx.clients,
                                  sim.now - started_s)
            writer.append_rows("participation", participation)
            writer.append_rows("energy", energy)
            totals.outcomes.update(row["outcome"] for row in participation)
            if energy:
                totals.energy_j = (totals.energy_j or 0.0) + math.fsum(row["energy_j"] for row in energy)
        evaluated = round_index % training.eval_every == 0 or round_index == training.rounds
        eval_loss = ctx.backend.evaluate(algorithm.eval_adapters()) if evaluated else float("nan")
        if evaluated:
            fleet.server.mark(round_index, "eval")
        losses = ctx.stats.losses
        row = {"round": round_index, "sim_time_s": sim.now, "wall_time_s": time.monotonic() - started,
               # fsum: exact, so the mean cannot depend on the order losses arrived in simulated time
               "train_loss": math.fsum(losses) / len(losses) if losses else float("nan"),
               "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss), "bytes_up": fleet.bytes_up,
               "bytes_down": fleet.bytes_down, "agg_error": ctx.stats.agg_error,
               "algorithm": algorithm.name}
        # Round 0 (prepare: HSplitLoRA's probes) steps the server independently: its order decides nothing
        row.update(ctx.backend.round_done(round_index, sim.rows(), algorithm.order_sensitive and round_index > 0))
        writer.append_rows("clients", clients)
        writer.append_rows("host_times", ctx.backend.take_host_times())
        writer.write_rounds(rows + [row])
        rows.append(row)  # once on disk: a run that cannot write a round ends without it
        writer.append_events(*sim.take_events())
        for name, table in algorithm.take_rows().items():
            writer.append_rows(name, table)
        log.info("round %d: %s", round_index, rows[-1])
        saver.save(round_index)
        # What the round left in cycles (Simulation.run pauses the automatic collector): the youngest generation
        # only, which holds what the run made since the last collection; a full one would walk every object of
        # the process (0.5 s a round where torch is imported, as in a notebook or benchmarks/overhead.py).
        gc.collect(0)
        progress.update(round_index, _round_status(row), keep=True)


def _round_status(row: dict) -> str:
    loss = "" if math.isnan(row["train_loss"]) else f"  train loss {row['train_loss']:.3f}"
    ppl = "" if math.isnan(row["eval_ppl"]) else f"  eval ppl {row['eval_ppl']:.2f}"
    return f"sim {row['sim_time_s']:.1f} s{loss}{ppl}"


def _finish(summary: dict, rounds: list[dict], started: float, totals: RunTotals) -> None:
    ppl = [r["eval_ppl"] for r in rounds if not math.isnan(r["eval_ppl"])]
    trained = sum(n for outcome, n in totals.outcomes.items() if outcome not in ("offline", "not selected"))
    summary.update(
        energy_j=totals.energy_j,
        participation=dict(sorted(totals.outcomes.items())),
        # of the updates clients trained for, the share that reached the aggregation
        reported_share=totals.outcomes["reported"] / trained if trained else None,
        rounds_completed=max((r["round"] for r in rounds), default=-1) if rounds else 0,
        final_eval_ppl=ppl[-1] if ppl else None,
        initial_eval_ppl=ppl[0] if ppl else None,
        best_eval_ppl=min(ppl) if ppl else None,
        sim_time_s=rounds[-1]["sim_time_s"] if rounds else 0.0,
        wall_time_s=time.monotonic() - started,
        bytes_up=rounds[-1]["bytes_up"] if rounds else 0,
        bytes_down=rounds[-1]["bytes_down"] if rounds else 0,
        finished_at=datetime.now(timezone.utc).isoformat(),
    )

