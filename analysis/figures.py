"""The figures of one run, in one registry that the run-end plots (`hsplit-sim run`) and the report
(`hsplit-sim report`) both draw from; and the figures that compare runs, which sweep reports use too.

Each figure reads the run directory only (analysis.load): per client in a small fleet, per device class in a
large one, so it stays readable and cheap at a thousand clients.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis.load import Run, load_run, read_table  # noqa: E402
from analysis.metrics import BREAKDOWN, BREAKDOWN_COLUMNS, bytes_per_round, time_breakdown  # noqa: E402
from analysis.plots import (  # noqa: E402
    SMALL_FLEET, STYLE, _legend_and_layout, _save, _time_unit, client_classes, plot_perplexity, plot_timeline)

BREAKDOWN_COLORS = {"compute": "#1f77b4", "upload": "#ff7f0e", "queue": "#bdbdbd", "server": "#d62728",
                    "download": "#ffbb78", "idle": "#f0f0f0"}
BREAKDOWN_LABELS = {"queue": "server queue"}  # results.WAIT_KINDS: waiting for a server accelerator
ENERGY_STATES = {"compute": "#1f77b4", "transmit": "#ff7f0e", "receive": "#ffbb78", "idle": "#d9d9d9"}
OUTCOME_COLORS = {"reported": "#2ca02c", "dropped": "#d62728", "late": "#ff7f0e", "offline at the end": "#9467bd",
                  "offline": "#bdbdbd", "not selected": "#e7e7e7"}


@dataclass(frozen=True)
class Figure:
    """One figure of a run: the stem of its files, its title in the report, how it is drawn (run, output base
    -> caption, files; no files when there is nothing to draw), and whether `hsplit-sim run` draws it."""

    name: str
    title: str
    draw: Callable[[Run, Path], tuple[str | None, list[Path]]]
    at_run_end: bool = False
    caption: str | None = None  # of a run-end figure, which the report may take as drawn


def report_figure(run: Run, figure: Figure, out_base: Path) -> tuple[str | None, list[Path]]:
    """A figure for the report: one `hsplit-sim run` drew at the end from these same tables is copied, not drawn
    again (at a thousand clients the timeline is the costliest figure); any other is drawn."""
    drawn = [run.path / "plots" / f"{figure.name}.{ext}" for ext in ("png", "svg")]
    if not (figure.at_run_end and all(path.is_file() for path in drawn)):
        return figure.draw(run, out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    copies = [out_base.with_name(f"{out_base.name}{path.suffix}") for path in drawn]
    for path, copy in zip(drawn, copies):
        shutil.copyfile(path, copy)
    return figure.caption, copies


def _sim_time(run: Run) -> float:
    return run.summary.get("sim_time_s") or (float(run.rounds["sim_time_s"].max()) if not run.rounds.empty else 0.0)


def _client_breakdown(run: Run) -> pd.DataFrame:
    """time_breakdown of every client with events, summed a row group of events at a time."""
    return time_breakdown(run.batches("events", list(BREAKDOWN_COLUMNS)), _sim_time(run))


def _mean_breakdown(run: Run) -> pd.Series:
    """Mean over all clients; clients with no events of their own (central training) were idle throughout."""
    table = _client_breakdown(run)
    n = run.summary.get("n_clients") or len(table)
    if not n:
        return pd.Series(dtype=float)
    totals = table.sum().reindex(list(BREAKDOWN), fill_value=0.0)
    totals["idle"] += _sim_time(run) * (n - len(table))
    return totals / n


def _breakdown_bars(parts: dict[str, pd.Series], out_base: Path, what: str = "",
                    spread: pd.DataFrame | None = None) -> list[Path]:
    """Stacked horizontal bars of compute, upload, server queue, server, download and idle time; `spread`
    (columns low and high, by bar) draws whiskers over where busy time ends."""
    parts = {k: v for k, v in parts.items() if not v.empty}
    if not parts:
        return []
    frame = pd.DataFrame(parts).T.reindex(columns=list(BREAKDOWN)).astype(float).fillna(0.0)
    scale, unit = _time_unit(frame.sum(axis=1).max())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 0.9 + 0.32 * len(frame)))
        left = np.zeros(len(frame))
        y = np.arange(len(frame))
        for category in BREAKDOWN:
            width = frame[category].to_numpy() / scale
            ax.barh(y, width, left=left, height=0.65, color=BREAKDOWN_COLORS[category],
                    label=BREAKDOWN_LABELS.get(category, category),
                    edgecolor="#999999" if category == "idle" else "white", linewidth=0.4)
            left += width
        if spread is not None:
            busy = frame.drop(columns="idle").sum(axis=1).to_numpy()
            low, high = spread["low"].reindex(frame.index).to_numpy(), spread["high"].reindex(frame.index).to_numpy()
            ax.errorbar(busy / scale, y, xerr=[(busy - low) / scale, (high - busy) / scale], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=3, label="least to most busy client")
        ax.set_yticks(y, frame.index)
        ax.invert_yaxis()
        ax.set_ylabel(what)
        ax.set_xlabel(f"Simulated time ({unit})")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, out_base)


def _client_breakdown_bars(run: Run, out_base: Path) -> tuple[str, list[Path]]:
    """A bar per client of a small fleet; of a larger one the mean of each device class, with whiskers from
    its least to its most busy client (a thousand bars would be unreadable). Returns the note and the files."""
    table, classes = _client_breakdown(run), client_classes(run)
    if len(table) <= SMALL_FLEET:
        parts = {f"{c} ({classes.at[c, 'device']})" if c in classes.index else str(c): row
                 for c, row in table.iterrows()}
        return "Each client's simulated time by activity.", _breakdown_bars(parts, out_base, "Client (device)")
    # Clients without events of their own were idle throughout: they count in their class's mean.
    table = table.reindex(table.index.union(classes.index))
    table["idle"] = table["idle"].fillna(_sim_time(run))
    table = table.fillna(0.0)
    group = classes["class"].reindex(table.index).fillna("unknown device")
    busy = table.drop(columns="idle").sum(axis=1)
    sizes = group.value_counts()
    label = {c: f"{c} ({sizes[c]:,})" for c in sizes.index}
    means = table.groupby(group, sort=False).mean().rename(index=label)
    spread = busy.groupby(group, sort=False).agg(low="min", high="max").rename(index=label)
    note = (f"Mean simulated time by activity of the clients of each device class (device / link; how many "
            f"clients in brackets), {len(table):,} clients in {len(means)} classes; whiskers run from the least "
            "to the most busy client of the class.")
    return note, _breakdown_bars(dict(means.iterrows()), out_base, "Device class (clients)", spread)


def _bytes_lines(runs: dict[str, Run], out_base: Path) -> list[Path]:
    per_round = {label: bytes_per_round(run.rounds) for label, run in runs.items() if not run.rounds.empty}
    per_round = {k: v for k, v in per_round.items() if not v.empty}
    if not per_round:
        return []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0), sharey=True)
        for ax, column, name in zip(axes, ("bytes_up", "bytes_down"), ("Uplink", "Downlink")):
            for i, (label, rows) in enumerate(per_round.items()):
                ax.plot(rows.index, rows[column] / 1e6, marker="osD^v*"[i % 6], markersize=4, linewidth=1.2,
                        label=label)
            ax.set_title(name)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("Round")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("Data per round (MB)")
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, out_base)


def _peak_memory(run: Run) -> pd.DataFrame:
    """Per client: peak memory and budget over the run, device and class; empty without memory figures."""
    clients = run.read("clients", ["client", "memory_bytes", "memory_budget_bytes"])
    if clients.empty or "memory_bytes" not in clients:
        return pd.DataFrame()
    peaks = clients.groupby("client").agg(memory=("memory_bytes", "max"), budget=("memory_budget_bytes", "max"))
    return peaks.join(client_classes(run))


def _memory_units(peaks: pd.DataFrame, by_class: bool) -> pd.DataFrame:
    """One row per bar: a client (named with its device), or a device class (named with its size): mean peak
    memory, its least and most (whiskers), and the budget (the smallest in the class)."""
    if not by_class:
        names = [f"{c}\n{d}" if isinstance(d, str) else str(c) for c, d in zip(peaks.index, peaks["device"])]
        return peaks.assign(low=peaks["memory"], high=peaks["memory"], name=names)
    table = peaks.groupby(peaks["class"].fillna("unknown device"), sort=False).agg(
        memory=("memory", "mean"), low=("memory", "min"), high=("memory", "max"), budget=("budget", "min"),
        clients=("memory", "size"))
    table["name"] = [c.replace(" / ", "\n") + f"\n({n:,} clients)" for c, n in zip(table.index, table["clients"])]
    return table


def _memory_bars(runs: dict[str, Run], out_base: Path) -> tuple[str, list[Path]]:
    """Grouped bars: per client (per device class in a large fleet), one bar per run, with the budget marked;
    log scale when they differ a lot. Returns the note and the files."""
    peaks = {label: _peak_memory(run) for label, run in runs.items()}
    peaks = {k: v for k, v in peaks.items() if not v.empty}
    by_class = any(len(p) > SMALL_FLEET for p in peaks.values())
    note = ("Mean peak memory over the run of the clients of each device class (bars; whiskers from the least to "
            "the most), and the smallest budget in the class (black marks)." if by_class else
            "Peak memory per client over the run (bars) and its budget (black marks).")
    if not peaks:
        return note, []
    peaks = {k: _memory_units(v, by_class) for k, v in peaks.items()}
    names = {}
    for peak in peaks.values():
        for unit, name in peak["name"].items():
            names.setdefault(unit, name)  # the first run to have the bar names it
    units = list(names) if by_class else sorted(names)
    width = 0.8 / len(peaks)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(7.5, 3.0 + 1.2 * len(units) if by_class else 4.5 + 0.9 * len(units)),
                                        3.2))
        everything = []
        for i, (label, peak) in enumerate(peaks.items()):
            peak = peak.reindex(units)
            x = np.arange(len(units)) - 0.4 + width * (i + 0.5)
            ax.bar(x, peak["memory"] / 1e9, width=width * 0.9, label=label)
            if by_class:
                ax.errorbar(x, peak["memory"] / 1e9, yerr=[(peak["memory"] - peak["low"]) / 1e9,
                                                           (peak["high"] - peak["memory"]) / 1e9],
                            fmt="none", ecolor="#444444", elinewidth=0.8, capsize=2)
            ax.scatter(x, peak["budget"] / 1e9, marker="_", s=300 * width, color="black", zorder=3,
                       label="budget" if i == 0 else None)
            everything += list(peak["memory"].dropna()) + list(peak["budget"].dropna())
        if max(everything) > 100 * min(v for v in everything if v > 0):
            ax.set_yscale("log")
            # Plain numbers (0.01, 10) read better than 10^-2 as GB, and need no mathtext (slow to start).
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xticks(range(len(units)), [names[u] for u in units])
        ax.set_xlabel("Device class" if by_class else "Client (device)")
        ax.set_ylabel("Memory (GB)")
        ax.grid(True, axis="y", alpha=0.3)
        _legend_and_layout(fig, ax, list(peaks))
        return note, _save(fig, out_base)


def _energy_bars(runs: dict[str, Run], out_base: Path) -> tuple[str, list[Path]]:
    """Mean energy per round by power state: per client of one small fleet, else per device class of each run."""
    shown = {}
    for label, run in runs.items():
        energy = read_table(run.path, "energy")
        if energy.empty:
            continue
        classes = client_classes(run)
        single = len(runs) == 1 and energy["client"].nunique() <= SMALL_FLEET
        if single:
            key = energy["client"].map(lambda c: f"{c} ({classes.at[c, 'device']})" if c in classes.index else str(c))
        else:
            key = energy["client"].map(classes["class"]).fillna("unknown device")
            if len(runs) > 1:
                key = label + ": " + key
        joules = energy[[f"{state}_j" for state in ENERGY_STATES]].groupby(key, sort=False).mean()
        shown.update({name: row for name, row in joules.iterrows()})
    if not shown:
        return "No device has power figures (catalog power_w).", []
    frame = pd.DataFrame(shown).T
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 0.9 + 0.32 * len(frame)))
        y, left = np.arange(len(frame)), np.zeros(len(frame))
        for state, color in ENERGY_STATES.items():
            width = frame[f"{state}_j"].to_numpy()
            ax.barh(y, width, left=left, height=0.65, color=color, label=state, edgecolor="white", linewidth=0.4)
            left += width
        ax.set_yticks(y, frame.index)
        ax.invert_yaxis()
        ax.set_xlabel("Energy per round (J)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        paths = _save(fig, out_base)
    what = "client" if len(runs) == 1 and len(frame) <= SMALL_FLEET else "device class (device / link)"
    return (f"Mean energy per round of each {what}, by power state: the time in each state times the device's "
            "power there (hsplit-sim devices lists the figures and their sources)."), paths


def _participation_bars(run: Run, out_base: Path) -> tuple[str, list[Path]]:
    """How many clients reported, dropped, were late or sat out in each round; only drawn when not all reported."""
    participation = read_table(run.path, "participation")
    if participation.empty or (participation["outcome"] == "reported").all():
        return "Every client reported in every round.", []
    counts = participation.groupby(["round", "outcome"]).size().unstack(fill_value=0)
    outcomes = [o for o in OUTCOME_COLORS if o in counts] + [o for o in counts if o not in OUTCOME_COLORS]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, 3.0))
        bottom = np.zeros(len(counts))
        for outcome in outcomes:
            ax.bar(counts.index, counts[outcome], bottom=bottom, color=OUTCOME_COLORS.get(outcome, "#7f7f7f"),
                   label=outcome, width=0.8)
            bottom += counts[outcome].to_numpy()
        ax.set_xlabel("Round")
        ax.set_ylabel("Clients")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return ("Each round's clients by how their round ended: reported (its update aggregated), dropped, late "
                "(deadline, or enough updates already), offline at the end (update lost), offline at the start, "
                "not selected."), _save(fig, out_base)


def _perplexity(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    return None, plot_perplexity(run, out_base)


TIMELINE = ("The first two training rounds (after round 0 where work comes before training: HSplitLoRA's importance "
            "probe), one row per device and link: of every client in a small fleet, else of the few clients the "
            "figure's title names.")


def _timeline(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    return TIMELINE, plot_timeline(run, out_base)


def _bytes(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    return "Sum over all clients.", _bytes_lines({run.algorithm: run}, out_base)


def _memory(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    return _memory_bars({run.algorithm: run}, out_base)


def _energy(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    return _energy_bars({run.algorithm: run}, out_base)


HOST_TIMES = ("Every real operation of the run: the seconds the time model gives the simulated device it stands for "
              "against the seconds it took on this host. Points on the dashed line: model and host agree (as they "
              "should where the simulated device is this host's calibrated entry); elsewhere the distance is the "
              "simulated device's speed against this host's, and its spread what the model leaves out.")


def _host_times(run: Run, out_base: Path) -> tuple[str | None, list[Path]]:
    host = read_table(run.path, "host_times")
    if host.empty:
        return None, []
    kinds = sorted(host["kind"].unique())
    events = run.read("events", ["round", "client", "kind", "start_s", "end_s"], sorted(host["round"].unique()))
    events = events[events["kind"].isin(kinds)].astype({"kind": str})
    events = events.assign(step=events.groupby(["round", "client", "kind"]).cumcount(),
                           simulated_s=events["end_s"] - events["start_s"])
    joined = host.merge(events, on=["round", "client", "kind", "step"])
    joined = joined[(joined["host_s"] > 0) & (joined["simulated_s"] > 0)]
    if joined.empty:
        return None, []
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.6))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (kind, rows) in enumerate(joined.groupby("kind")):
            ax.scatter(rows["host_s"], rows["simulated_s"], s=10, alpha=0.6, color=colors[i % len(colors)],
                       label=f"{kind} ({len(rows)})")
        low = min(joined["host_s"].min(), joined["simulated_s"].min())
        high = max(joined["host_s"].max(), joined["simulated_s"].max())
        ax.plot([low, high], [low, high], "k--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # milliseconds at 1, 2, 5 of each decade: plain numbers
            axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1e3:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("Measured on this host (ms)")
        ax.set_ylabel("Simulated (ms)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return HOST_TIMES, _save(fig, out_base)


RUN_FIGURES = (
    Figure("perplexity", "Perplexity against simulated time", _perplexity, at_run_end=True),
    Figure("timeline", "Timeline", _timeline, at_run_end=True, caption=TIMELINE),
    Figure("time_breakdown", "Time breakdown", _client_breakdown_bars),
    Figure("bytes_per_round", "Bytes per round", _bytes),
    Figure("memory", "Memory against budget", _memory),
    Figure("participation", "Participation", _participation_bars),
    Figure("energy", "Energy", _energy),
    Figure("host_times", "Simulated against measured seconds", _host_times, at_run_end=True, caption=HOST_TIMES),
)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run-end figures into RUN/plots/; a figure without data is skipped, so a missing path in the
    result means there was nothing to plot."""
    run = load_run(run_dir, lazy=True)  # the timeline reads the few rounds it draws
    return [path for figure in RUN_FIGURES if figure.at_run_end
            for path in figure.draw(run, run.path / "plots" / figure.name)[1]]
