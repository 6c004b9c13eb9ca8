"""The `hsplit-sim` command line.

Experiment modules are imported inside their handlers, after the scenario has loaded: they pull
in torch and ZeroMQ, and validate, devices, schema and a bad scenario file must answer fast.
"""

import argparse
import json
import logging
import sys

from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.runtime import stop  # past the experiment layer on purpose: the process entry point installs
                                     # the Ctrl-C/SIGTERM flag that worker connections read (no heavy imports)


DEFAULT_WORKER_FRAME = 64 << 20  # a worker started by hand takes each run's frame limit at init, up to --max-frame


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; expected failures become one `error:` line and an exit status."""
    parser = _parser()
    stop.install()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.handler(args)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsplit-sim", description="Heterogeneous split LoRA fine-tuning, simulated in time and trained for real."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a scenario or sweep file without running it")
    _scenario_arguments(validate, "scenario or sweep YAML file")
    validate.set_defaults(handler=_validate)

    run = commands.add_parser("run", help="run a scenario and write a run directory")
    _scenario_arguments(run, optional=True)
    run.add_argument("--timing-only", action="store_true",
                     help="simulate time only: costs and bytes from the cost model, no workers, no training "
                          "(same as --set runtime.timing_only=true)")
    run.add_argument("--replay", metavar="RUN_DIR", default=None,
                     help="re-time the training of a run directory with the same training key under this "
                          "scenario's system (same as --set runtime.replay_from=RUN_DIR)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue a run that stopped (crashed, failed, interrupted) from its last complete round, "
                          "in its own directory and with its own scenario (no FILE or other option)")
    run.set_defaults(handler=_run)

    devices = commands.add_parser("devices", help="list the built-in devices and links with their sources")
    devices.set_defaults(handler=_devices)

    project = commands.add_parser(
        "project", help="a trained run's accuracy beside the per-round times of another scenario (timing only)")
    project.add_argument("trained_run", metavar="TRAINED_RUN", help="a completed trained run directory")
    project.add_argument("--system", required=True, metavar="SCENARIO",
                         help="the scenario whose devices, links and model time the rounds (same algorithm), or the "
                              "name of a shipped example; it runs as many rounds as the trained run unless --set "
                              "training.rounds says fewer")
    project.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a field of the --system scenario (repeatable)")
    project.set_defaults(handler=_project)

    calibrate = commands.add_parser(
        "calibrate", help="time real segment steps on this machine and write a device entry fitted to them")
    calibrate.add_argument("--models", default="tiny-gpt2,tiny-llama,smollm2-135m",
                           help="built-in models whose segments are timed, comma-separated (default: %(default)s)")
    calibrate.add_argument("--repeats", type=_positive, default=5, metavar="N",
                           help="timed repeats per step, after one warm-up; the median counts (default: 5)")
    calibrate.add_argument("--name", default="host", help="the device entry's name (default: host)")
    calibrate.add_argument("--out", default="host-device.yaml", metavar="FILE",
                           help="where the device entry is written (default: host-device.yaml); never overwritten")
    calibrate.set_defaults(handler=_calibrate)

    schema = commands.add_parser("schema", help="print the scenario JSON schema")
    schema.set_defaults(handler=_schema)

    sweep = commands.add_parser("sweep", help="run a base scenario over grid/zip axes, points in parallel")
    _scenario_arguments(sweep, "sweep YAML file (base scenario plus axes)")
    sweep.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="run points as local processes, or as tasks on a Ray cluster (RAY_ADDRESS, else a local "
                            "Ray instance; needs pip install 'hsplit-sim[ray]')")
    sweep.add_argument("--processes", type=_positive, default=None, metavar="N",
                       help="points run at once (default: cores // 2; never above the cores)")
    sweep.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the sweep in DIR: completed points are skipped")
    sweep.add_argument("--timing-only", action="store_true",
                       help="every point simulates time only (runtime.timing_only=true): no training")
    sweep.add_argument("--no-reuse", action="store_true",
                       help="train every point, even those that differ from another only in the system "
                            "(bandwidths, device speeds, server accelerators)")
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser("report", help="figures and an HTML page for a run or sweep directory")
    report.add_argument("dir", help="run directory or sweep directory")
    report.add_argument("--refresh", action="store_true",
                        help="first rebuild a sweep's table from its points' run directories (after an upgrade "
                             "adds columns, or a point rerun by hand); runs nothing")
    report.set_defaults(handler=_report)

    examples = commands.add_parser("examples", help="list the example scenarios and sweeps that ship with the package")
    examples.add_argument("--copy", metavar="DIR", default=None, help="write every example into DIR for editing")
    examples.set_defaults(handler=_examples)

    worker = commands.add_parser(
        "worker", help="start a server or client worker by hand, for a coordinator holding the same key file")
    worker.add_argument("--listen", required=True, metavar="ADDR",
                        help="ZeroMQ endpoint to listen on: tcp://HOST:PORT (PORT * for a free one) or ipc://PATH")
    worker.add_argument("--key", required=True, metavar="FILE",
                        help="the key file (hsplit-sim keygen) that the coordinator's runtime.key_file names")
    worker.add_argument("--name", default="remote", help="the worker's name in its log lines (default: remote)")
    worker.add_argument("--max-frame", type=_positive, default=DEFAULT_WORKER_FRAME, metavar="BYTES",
                        help="refuse frames above this many bytes unread (default: 64 MiB); each run sets its own "
                             "limit up to this")
    worker.set_defaults(handler=_worker)

    keygen = commands.add_parser("keygen", help="write a new CurveZMQ key file for runtime.key_file (mode 0600)")
    keygen.add_argument("file", metavar="FILE", help="where the secret certificate goes; never overwritten")
    keygen.set_defaults(handler=_keygen)
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _scenario_arguments(parser: argparse.ArgumentParser, what: str = "scenario YAML file",
                        optional: bool = False) -> None:
    parser.add_argument("file", nargs="?" if optional else None,
                        help=f"{what}, or the name of a shipped example (see hsplit-sim examples)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. training.rounds=5 or clients.0.count=10 (repeatable)",
    )


def _validate(args: argparse.Namespace) -> int:
    from hsplit_sim.scenario import expanded_clients, load_scenario, scenario_path
    from hsplit_sim.scenario.load import read_mapping

    path = scenario_path(args.file)
    if "base" in read_mapping(path):
        return _validate_sweep(path, args.overrides)
    scenario = load_scenario(path, args.overrides)
    from hsplit_sim.experiment.preflight import preflight

    preflight(scenario)
    model = scenario.model.name or scenario.model.path
    print(
        f"{scenario.name}: model {model}, algorithm {scenario.algorithm.name}, "
        f"{len(expanded_clients(scenario))} clients, {scenario.training.rounds} rounds"
    )
    print("ok")
    return 0


def _validate_sweep(path, overrides: list[str]) -> int:
    """A sweep file: every point validated and checked as `sweep` does before it runs anything (a point's memory
    check is its own run's: one that does not fit is a result, not an error)."""
    from hsplit_sim.experiment.preflight import check_sweep
    from hsplit_sim.experiment.sweep import load_sweep_file

    sweep = load_sweep_file(path, overrides)
    check_sweep(sweep)
    print(f"{sweep.name}: sweep of {len(sweep.points)} points over {', '.join(sweep.axes) or 'no axes'}")
    print("ok")
    return 0


def _run(args: argparse.Namespace) -> int:
    from hsplit_sim.scenario import load_scenario, scenario_path

    if args.resume is not None:
        if args.file or args.overrides or args.timing_only or args.replay:
            raise ScenarioError("--resume: the run directory holds the scenario; give no FILE, --set, --timing-only "
                                "or --replay with it")
        from hsplit_sim.experiment.run import resume_run

        run_dir = resume_run(args.resume)
        _plot(run_dir)
        print(run_dir)
        return 0
    if args.file is None:
        raise ScenarioError("run: give a scenario FILE (or --resume RUN_DIR)")
    overrides = list(args.overrides)
    if args.timing_only:
        overrides.append("runtime.timing_only=true")
    if args.replay:
        overrides.append(f"runtime.replay_from={args.replay}")
    scenario = load_scenario(scenario_path(args.file), overrides)
    from hsplit_sim.experiment.run import run_scenario

    run_dir = run_scenario(scenario)
    _plot(run_dir)
    print(run_dir)
    return 0


def _project(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hsplit_sim.scenario import load_scenario, scenario_path

    summary = Path(args.trained_run) / "summary.json"
    rounds = json.loads(summary.read_text()).get("rounds_completed") if summary.is_file() else None
    defaults = ["runtime.timing_only=true"] + ([f"training.rounds={rounds}"] if rounds else [])
    scenario = load_scenario(scenario_path(args.system), [*defaults, *args.overrides])
    from hsplit_sim.experiment.run import project_run

    run_dir = project_run(args.trained_run, scenario)
    _plot(run_dir)
    print(run_dir)
    return 0


def _plot(run_dir) -> None:
    """The run-end figures (RUN/plots/), drawn here, not by the run: a run writes tables, and figures are a
    convenience over them, so a plotting problem is logged, never fatal (`hsplit-sim report` draws them again)."""
    try:
        from analysis.figures import plot_run

        plot_run(run_dir)
    except Exception:  # noqa: BLE001 - the tables on disk are the result
        logging.getLogger("hsplit_sim").exception("plotting %s failed", run_dir)


def _sweep(args: argparse.Namespace) -> int:
    from hsplit_sim.experiment.sweep import load_sweep_file, run_sweep
    from hsplit_sim.scenario import scenario_path

    overrides = list(args.overrides) + (["runtime.timing_only=true"] if args.timing_only else [])
    sweep = load_sweep_file(scenario_path(args.file), overrides)
    from hsplit_sim.experiment.preflight import check_sweep

    check_sweep(sweep)
    sweep_dir = run_sweep(sweep, resume=args.resume, processes=args.processes, reuse=not args.no_reuse,
                          executor=args.executor)
    print(sweep_dir)
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.report import report
    from hsplit_sim.experiment.coordinator import reconcile

    reconcile(args.dir)  # a run directory whose coordinator died is reported as crashed, not running
    if args.refresh:
        from hsplit_sim.experiment.sweep import refresh_table

        refresh_table(args.dir)

    try:
        page = report(args.dir)
    except FileNotFoundError as e:
        raise ScenarioError(str(e)) from None
    print(page)
    return 0


def _devices(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hsplit_sim.scenario import DEVICES, LINKS

    devices = Table(title="Devices (matmuls at peak TFLOPS in the simulated precision x efficiency or at the memory "
                    "bandwidth, whichever is slower; memory-bound operations at the bandwidth; plus a launch "
                    "overhead per kernel)")
    for column in ("name", "TFLOPS FP32 / FP16 / BF16", "efficiency", "memory GB", "memory GB/s",
                   "launch us", "power W: compute / send / receive / idle"):
        devices.add_column(column)
    for d in DEVICES.values():
        rates = " / ".join("-" if (r := d.peak_tflops(p)) is None else f"{r:g}" for p in ("fp32", "fp16", "bf16"))
        bandwidth = "-" if d.memory_bandwidth_gbps is None else f"{d.memory_bandwidth_gbps:g}"
        power = "-" if d.power_w is None else " / ".join(
            f"{getattr(d.power_w, state):g}" for state in ("compute", "transmit", "receive", "idle"))
        overhead = "-" if d.launch_overhead_us is None else f"{d.launch_overhead_us:g}"
        devices.add_row(d.name, rates, f"{d.efficiency:g}", f"{d.memory_gb:g}", bandwidth, overhead, power)

    links = Table(title="Links")
    for column in ("name", "up Mbps", "down Mbps", "latency ms"):
        links.add_column(column)
    for link in LINKS.values():
        links.add_row(link.name, f"{link.up_mbps:g}", f"{link.down_mbps:g}", f"{link.latency_ms:g}")

    # Sources are long sentences: listed under the tables rather than squeezed into a column.
    console = Console(highlight=False)
    console.print(devices)
    console.print(links)
    console.print("Sources", style="bold")
    for spec in [*DEVICES.values(), *LINKS.values()]:
        console.print(f"{spec.name}: {spec.source}", markup=False)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import datetime
    import os
    import platform
    from pathlib import Path

    import yaml

    from hsplit_sim.scenario.models import BUILTIN_MODELS, CONFIG_ONLY

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in BUILTIN_MODELS or m in CONFIG_ONLY]
    if unknown or not models:
        trainable = ", ".join(m for m in BUILTIN_MODELS if m not in CONFIG_ONLY)
        raise ScenarioError(f"--models: {', '.join(unknown) or 'none given'}; built-in models with weights: {trainable}")
    out = Path(args.out)
    if out.exists():
        raise ScenarioError(f"--out: {out} exists; calibrate never overwrites a file")

    from hsplit_sim.sim.calibration import host_device, relative_errors, step_work
    from hsplit_sim.training import calibration

    shapes = calibration.default_shapes(models)
    print(f"timing {len(shapes)} segment shapes x 3 steps, {args.repeats} repeats each", file=sys.stderr)
    tflops, bandwidth = calibration.matmul_tflops(), calibration.memory_bandwidth_gbps()
    measured = calibration.measure_shapes(
        shapes, args.repeats, lambda done, total: print(f"  {done}/{total} shapes", file=sys.stderr))
    works = [step_work(m.shape.model, m.kind, m.shape.split, m.shape.batch, m.shape.seq) for m in measured]
    seconds = [m.seconds for m in measured]
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    where = f"{datetime.date.today()}, {platform.node() or 'this host'} ({platform.processor() or platform.machine()}"
    where += f", {calibration.torch_threads()} torch threads)"
    device = host_device(args.name, works, seconds, tflops, bandwidth, memory_gb, where)
    out.write_text(yaml.safe_dump(device.model_dump(exclude_none=True), sort_keys=False, width=120))

    errors = relative_errors(device, works, seconds)
    print(f"{'model':14s} {'split':>5s} {'tokens':>9s} {'step':12s} {'measured ms':>12s} {'predicted ms':>13s} "
          f"{'error':>7s}")
    for m, error in zip(measured, errors):
        tokens = f"{m.shape.batch}x{m.shape.seq}"
        print(f"{m.shape.model:14s} {m.shape.split:5d} {tokens:>9s} {m.kind:12s} {m.seconds * 1e3:12.3f} "
              f"{m.seconds * (1 + error) * 1e3:13.3f} {error:+7.1%}")
    print(f"peak {device.tflops:g} TFLOPS (measured), efficiency {device.efficiency:g}, bandwidth "
          f"{device.memory_bandwidth_gbps:g} GB/s (measured), launch overhead {device.launch_overhead_us:g} us")
    print(f"wrote {out}: use it inline as a device, e.g. --set 'clients.0.device="
          f"{json.dumps(device.model_dump(exclude_none=True, exclude={'source'}))}'")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from hsplit_sim.scenario.examples import EXAMPLES_DIR, copy_examples, examples

    if args.copy:
        written = copy_examples(args.copy)
        print(f"{len(written)} files written below {args.copy}")
        return 0
    shipped = examples()
    width = max(len(example.name) for example in shipped)
    print(f"Examples shipped in {EXAMPLES_DIR.resolve()}:")
    for example in shipped:
        print(f"  {example.name:<{width}}  {example.kind:<8}  {example.description}")
    print("Run one by name (hsplit-sim run tiny; hsplit-sim sweep whatif/bandwidth), or copy them all for editing "
          "(hsplit-sim examples --copy DIR).")
    return 0


def _worker(args: argparse.Namespace) -> int:
    import re

    if not re.fullmatch(r"tcp://[^\s/]+:(\*|\d{1,5})|ipc://\S+", args.listen):
        raise ScenarioError(f"--listen: {args.listen!r} is not tcp://HOST:PORT or ipc://PATH")
    from hsplit_sim.runtime.keys import KeyFileError
    from hsplit_sim.runtime.worker import serve_by_hand

    try:
        serve_by_hand(args.listen, args.key, args.name, args.max_frame,
                      lambda text: print(text, file=sys.stderr, flush=True))
    except KeyFileError as e:
        raise ScenarioError(f"--key: {e}") from None
    except OSError as e:
        raise ScenarioError(f"--listen: {e}") from None
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from hsplit_sim.runtime.keys import KeyFileError, write_key_file

    try:
        keys = write_key_file(args.file)
    except KeyFileError as e:
        raise ScenarioError(str(e)) from None
    print(f"{args.file}: public key {keys.public.decode()}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from hsplit_sim.scenario.schema import scenario_json_schema

    print(json.dumps(scenario_json_schema(), indent=2))
    return 0


if __name__ == "__main__":  # the sweep runs each point as `python -m hsplit_sim.cli run FILE`
    sys.exit(main())
