"""`hsplit-sim report DIR`: figures (PNG and SVG) and one self-contained HTML page for a run or a sweep.

Everything comes from the files of the directory: sweep.parquet and sweep.resolved.yaml for a sweep, each
point's run directory for its curves, events and clients.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter  # noqa: E402

from analysis.load import Run, load_run, read_table  # noqa: E402
from analysis.metrics import BREAKDOWN, BREAKDOWN_COLUMNS, bytes_per_round, time_breakdown  # noqa: E402
from analysis.plots import (  # noqa: E402
    SMALL_FLEET, STYLE, _save, _time_unit, client_classes, plot_perplexity, plot_timeline)
from hsplit_sim.results import GENERATION_METRICS  # noqa: E402

BREAKDOWN_COLORS = {"compute": "#1f77b4", "upload": "#ff7f0e", "queue": "#bdbdbd", "server": "#d62728",
                    "download": "#ffbb78", "idle": "#f0f0f0"}
BREAKDOWN_LABELS = {"queue": "server queue"}  # results.WAIT_KINDS: waiting for a server accelerator
METRICS = {"final_eval_ppl": "Final evaluation perplexity", "time_to_target_s": "Time to target perplexity"}
TIMING_METRICS = {"sim_time_s": "Simulated time"}  # a timing-only sweep trained nothing: no perplexity
RESULT_COLUMNS = ("status", "final_eval_ppl", "time_to_target_s", "sim_time_s", "bytes_up", "bytes_down",
                  "energy_j", "reported_share", *GENERATION_METRICS)
ENERGY_STATES = {"compute": "#1f77b4", "transmit": "#ff7f0e", "receive": "#ffbb78", "idle": "#d9d9d9"}
OUTCOME_COLORS = {"reported": "#2ca02c", "dropped": "#d62728", "late": "#ff7f0e", "offline at the end": "#9467bd",
                  "offline": "#bdbdbd", "not selected": "#e7e7e7"}
MAX_LINES = 8  # more curves than this on one axis stop being readable
LONG_LABEL = 40  # characters of a legend label beyond which the legend goes below the axes


def load_sweep(path: str | Path) -> pd.DataFrame:
    """The sweep table, one row per point; attrs hold axes, zip_axes, target_ppl, reference (published figures
    or None), name and the directory."""
    sweep_dir = Path(path)
    parquet, csv = sweep_dir / "sweep.parquet", sweep_dir / "sweep.csv"
    if parquet.is_file():
        table = pd.read_parquet(parquet)
    elif csv.is_file():
        table = pd.read_csv(csv)
    else:
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory: it has no sweep.parquet or sweep.csv")
    resolved_file = sweep_dir / "sweep.resolved.yaml"
    resolved = yaml.safe_load(resolved_file.read_text()) if resolved_file.is_file() else {}
    target = table["target_ppl"].dropna() if "target_ppl" in table else pd.Series(dtype=float)
    table.attrs.update(
        path=str(sweep_dir), name=resolved.get("name", sweep_dir.name), axes=resolved.get("axes", []),
        zip_axes=resolved.get("zip_axes", []), target_ppl=float(target.iloc[0]) if not target.empty else math.nan,
        reference=resolved.get("reference"),
    )
    return table


def report(path: str | Path) -> Path:
    """Write DIR/report/ (figures and index.html) for a sweep or run directory; returns the page's path."""
    directory = Path(path)
    out = directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    if (directory / "sweep.parquet").is_file() or (directory / "sweep.csv").is_file():
        title, sections = _sweep_sections(load_sweep(directory), out)
    else:
        run = load_run(directory, lazy=True)  # events and clients: only the columns each figure needs
        title, sections = f"Run {run.name}", _run_sections(run, out)
    page = out / "index.html"
    page.write_text(_html(title, sections))
    return page


# --- sweeps -----------------------------------------------------------------------------------------------------

def _sweep_sections(table: pd.DataFrame, out: Path) -> tuple[str, list]:
    sweep_dir = Path(table.attrs["path"])
    factors = _factors(table)
    labels = _point_labels(table, factors)
    runs = {}
    for row, label in zip(table.itertuples(index=False), labels):
        run_dir = getattr(row, "run_dir")
        if isinstance(run_dir, str) and (sweep_dir / run_dir).is_dir():
            runs[label] = load_run(sweep_dir / run_dir, lazy=True)
    target = table.attrs["target_ppl"]
    metrics = METRICS if table["final_eval_ppl"].notna().any() else TIMING_METRICS
    if metrics is METRICS:
        sections = [
            ("Perplexity against simulated time", "One line per point.", _perplexity_lines(runs, out / "perplexity")),
            ("Time to target perplexity", f"Target: perplexity {target:.4g} "
             + ("(from the sweep file)." if _target_given(sweep_dir)
                else "(the worst final perplexity among completed points, so every completed point reaches it)."),
             _time_to_target_bars(table, labels, out / "time_to_target")),
        ]
    else:
        sections = [("Perplexity", "No point trained (a timing-only sweep): the figures below show simulated time.",
                     "")]
    sections.append(("Results", "One row per point; generation scores on the test set where the run decoded it.",
                     _results_html(table, labels)))
    if table.attrs.get("reference"):
        sections.append(_reference_section(table, table.attrs["reference"]))
    for i, factor in enumerate(factors):
        others = [f for f in factors if f is not factor]
        sections.append((f"Final metrics against {_factor_name(factor)}",
                         "Mean over seeds" + (f"; one line per {', '.join(_factor_name(f) for f in others)}."
                                              if others else "."),
                         _metric_lines(table, factor, others, metrics, out / f"axis_{i}")))
    if len(factors) == 2:
        sections.append(("Final metrics over both axes", "Mean over seeds.",
                         _heatmaps(table, factors, metrics, out / "heatmap")))
    sections += [
        ("Bytes per round", "Sum over all clients of what crossed the links in each training round.",
         _bytes_lines(runs, out / "bytes_per_round")),
        ("Time breakdown", "Mean over clients of each client's simulated time.",
         _breakdown_bars({label: _mean_breakdown(run) for label, run in runs.items()}, out / "time_breakdown")),
        ("Memory against budget", *_memory_bars(runs, out / "memory")),
        ("Energy", *_energy_bars(runs, out / "energy")),
        ("Sweep table", None, _table_html(table)),
    ]
    return f"Sweep {table.attrs['name']}", sections


def _target_given(sweep_dir: Path) -> bool:
    resolved = sweep_dir / "sweep.resolved.yaml"
    return resolved.is_file() and (yaml.safe_load(resolved.read_text()) or {}).get("target_ppl") is not None


def _factors(table: pd.DataFrame) -> list[list[str]]:
    """What was varied independently: each grid axis alone, all zip axes as one group; seeds are averaged."""
    axes = [a for a in table.attrs["axes"] if a != "seed" and a in table]
    zipped = [a for a in table.attrs["zip_axes"] if a in axes]
    factors = [[a] for a in axes if a not in zipped] + ([zipped] if zipped else [])
    return [f for f in factors if table[f[0]].nunique() > 1]


def _short(axis: str) -> str:
    """`algorithm.name` reads as algorithm, `clients.0.link.up_mbps` as up_mbps."""
    parts = axis.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _factor_name(factor: list[str]) -> str:
    shorts = [_short(a) for a in factor]
    return " / ".join(factor if len(set(shorts)) < len(shorts) else shorts)


def _value(value) -> str:
    """An axis value as the sweep file wrote it; a null there (read back as NaN) is "none"."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "none"
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def _legend_and_layout(fig: plt.Figure, ax, labels: list[str]) -> None:
    """The legend beside the axes; below them, in room added to the figure, when labels are long enough to
    squeeze the plot."""
    if max(map(len, labels), default=0) <= LONG_LABEL:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return
    height, extra = fig.get_figheight(), 0.1 + 0.21 * len(labels)
    fig.set_figheight(height + extra)
    fig.tight_layout(rect=(0, extra / (height + extra), 1, 1))
    fig.legend(*ax.get_legend_handles_labels(), loc="lower left", bbox_to_anchor=(0.01, 0.0), frameon=False)


def _describe(axes: list[str], values: list) -> str:
    """"algorithm, name=value, ..." for one point; axes that share a short name and a value (a zip moving
    every client's link together) are named once, and axes whose short names collide otherwise in full."""
    shorts = [_short(a) for a in axes]
    parts, named = [], set()
    for axis, short, value in zip(axes, shorts, values):
        alike = {_value(v) for s, v in zip(shorts, values) if s == short}
        if len(alike) == 1 and short in named:
            continue
        named.add(short)
        name = short if len(alike) == 1 else axis
        parts.append(_value(value) if name == "algorithm" else f"{name}={_value(value)}")
    return ", ".join(parts)


def _point_labels(table: pd.DataFrame, factors: list[list[str]]) -> list[str]:
    axes = [a for f in factors for a in f]
    if table["seed"].nunique() > 1:
        axes.append("seed")
    return [_describe(axes, [row[a] for a in axes]) or str(row["point"]) for _, row in table.iterrows()]


def _perplexity_lines(runs: dict[str, Run], out_base: Path) -> list[Path]:
    """Like plot_perplexity, but wide enough for a legend of axis values beside the axes."""
    curves = {label: run.rounds[run.rounds["eval_ppl"] > 0].sort_values("sim_time_s")
              for label, run in runs.items() if not run.rounds.empty}
    curves = {k: v for k, v in curves.items() if not v.empty}
    if not curves:
        return []
    scale, unit = _time_unit(max(rows["sim_time_s"].max() for rows in curves.values()))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        for i, (label, rows) in enumerate(curves.items()):
            ax.plot(rows["sim_time_s"] / scale, rows["eval_ppl"], marker="osD^v*PX"[i % 8], markersize=4,
                    linewidth=1.5, label=label)
        ax.set_xlabel(f"Simulated time ({unit})")
        ax.set_ylabel("Evaluation perplexity")
        ax.grid(True, alpha=0.3)
        _legend_and_layout(fig, ax, list(curves))
        return _save(fig, out_base)


def _seconds(value: float) -> str:
    scale, unit = _time_unit(value)
    return f"{value / scale:.3g} {unit}"


def _time_to_target_bars(table: pd.DataFrame, labels: list[str], out_base: Path) -> list[Path]:
    times = table["time_to_target_s"].to_numpy(dtype=float)
    if np.isnan(times).all():
        return []
    scale, unit = _time_unit(np.nanmax(times))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 0.8 + 0.3 * len(labels)))
        y = np.arange(len(labels))
        ax.barh(y, np.nan_to_num(times / scale), color="#1f77b4", height=0.6)
        for i, (t, status) in enumerate(zip(times, table["status"])):
            text = ("not reached" if status == "completed" else str(status)) if math.isnan(t) else _seconds(t)
            ax.annotate(text, (0 if math.isnan(t) else t / scale, i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8, color="#555555")
        ax.set_xlim(0, np.nanmax(times) / scale * 1.15)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel(f"Simulated time to target perplexity ({unit})")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        return _save(fig, out_base)


def _means(table: pd.DataFrame, keys: list[str], metrics: dict[str, str]) -> pd.DataFrame:
    done = table[table["status"] == "completed"]
    return done.groupby(keys, sort=False)[list(metrics)].mean().reset_index()


def _numeric(values: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def _metric_lines(table: pd.DataFrame, factor: list[str], others: list[list[str]], metrics: dict[str, str],
                  out_base: Path) -> list[Path]:
    """Each metric against one factor; one line per combination of the other factors (capped, else averaged)."""
    other_axes = [a for f in others for a in f]
    if other_axes and table.groupby(other_axes).ngroups > MAX_LINES:
        other_axes = []
    means = _means(table, factor + other_axes, metrics)
    if means.empty:
        return []
    x_axis = factor[0]
    numeric = _numeric(means[x_axis])
    categories = list(dict.fromkeys(table[x_axis]))
    groups = list(means.groupby(other_axes, sort=False)) if other_axes else [((), means)]
    max_time = max(means[m].max() for m in metrics if m.endswith("_s"))
    scale, unit = _time_unit(max_time if not math.isnan(max_time) else 1.0)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.0), squeeze=False)
        axes = axes[0]
        for ax, (metric, name) in zip(axes, metrics.items()):
            for i, (key, rows) in enumerate(groups):
                key = key if isinstance(key, tuple) else (key,)
                x = rows[x_axis] if numeric else [categories.index(v) for v in rows[x_axis]]
                y = rows[metric] / (scale if metric.endswith("_s") else 1.0)
                label = _describe(other_axes, list(key)) or None
                ax.plot(x, y, marker="osD^v"[i % 5], markersize=4, linewidth=1.5, label=label)
            if numeric and means[x_axis].min() > 0 and means[x_axis].max() >= 20 * means[x_axis].min():
                ax.set_xscale("log")
                ticks = sorted(means[x_axis].unique())
                ax.set_xticks(ticks, [_value(t) for t in ticks])
                ax.minorticks_off()
            elif not numeric:
                ax.set_xticks(range(len(categories)), [_value(c) for c in categories])
            ax.set_xlabel(_axis_label(factor, table))
            ax.set_ylabel(name + (f" ({unit})" if metric.endswith("_s") else ""))
            ax.grid(True, alpha=0.3)
        if other_axes:
            axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, out_base)


def _axis_label(factor: list[str], table: pd.DataFrame) -> str:
    """The first axis of a factor names it; zipped partners are listed so readers know they moved too."""
    units = {"up_mbps": "uplink (Mbit/s)", "down_mbps": "downlink (Mbit/s)", "latency_ms": "latency (ms)",
             "accelerators": "server accelerators", "count": "clients", "memory_budget_gb": "memory budget (GB)",
             "rank_set": "rank set", "name": "algorithm"}
    first = units.get(factor[0].split(".")[-1], _short(factor[0]))
    if factor[0].startswith("clients.") and factor[0].split(".")[1].isdigit():
        first = f"group {factor[0].split('.')[1]} {first}"
    return first + (f" (with {', '.join(factor[1:])})" if len(factor) > 1 else "")


def _heatmaps(table: pd.DataFrame, factors: list[list[str]], metrics: dict[str, str], out_base: Path) -> list[Path]:
    row_axis, col_axis = factors[0][0], factors[1][0]
    means = _means(table, [row_axis, col_axis], metrics)
    if means.empty:
        return []
    rows, cols = list(dict.fromkeys(table[row_axis])), list(dict.fromkeys(table[col_axis]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.25 * len(metrics), 0.9 + 0.45 * len(rows)),
                                 squeeze=False)
        for ax, (metric, name) in zip(axes[0], metrics.items()):
            grid = means.pivot(index=row_axis, columns=col_axis, values=metric).reindex(index=rows, columns=cols)
            values = grid.to_numpy(dtype=float)
            unit = ""
            if metric.endswith("_s") and not np.isnan(values).all():
                scale, unit = _time_unit(np.nanmax(values))
                values, unit = values / scale, f" ({unit})"
            image = ax.imshow(values, cmap="viridis_r", aspect="auto")
            for (i, j), v in np.ndenumerate(values):
                text = "—" if math.isnan(v) else f"{v:.3g}"
                finite = values[~np.isnan(values)]
                dark = not math.isnan(v) and finite.size and v > (finite.min() + finite.max()) / 2
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            ax.set_xticks(range(len(cols)), [_value(c) for c in cols])
            ax.set_yticks(range(len(rows)), [_value(r) for r in rows])
            ax.set_xlabel(_axis_label(factors[1], table))
            ax.set_ylabel(_axis_label(factors[0], table))
            ax.set_title(name + unit)
            fig.colorbar(image, ax=ax, shrink=0.9)
        fig.tight_layout()
        return _save(fig, out_base)


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


# --- single runs ------------------------------------------------------------------------------------------------

def _run_sections(run: Run, out: Path) -> list:
    summary = pd.DataFrame({"value": {k: v for k, v in run.summary.items() if not isinstance(v, (dict, list))}})
    return [
        ("Summary", None, summary.to_html(border=0, float_format=lambda v: f"{v:.6g}")),
        ("Perplexity against simulated time", None, plot_perplexity(run, out / "perplexity")),
        ("Timeline", "The first two training rounds, one row per device and link: of every client in a small "
         "fleet, else of the few clients the figure's title names.", plot_timeline(run, out / "timeline")),
        ("Time breakdown", *_client_breakdown_bars(run, out / "time_breakdown")),
        ("Bytes per round", "Sum over all clients.", _bytes_lines({run.algorithm: run}, out / "bytes_per_round")),
        ("Memory against budget", *_memory_bars({run.algorithm: run}, out / "memory")),
        ("Participation", *_participation_bars(run, out / "participation")),
        ("Energy", *_energy_bars({run.algorithm: run}, out / "energy")),
        ("Rounds", None, run.rounds.to_html(index=False, border=0, float_format=lambda v: f"{v:.6g}")),
    ]


# --- the page ---------------------------------------------------------------------------------------------------

def _results_html(table: pd.DataFrame, labels: list[str]) -> str:
    """The comparison a reader looks for first: quality, time and traffic per point, empty columns left out."""
    shown = table[[c for c in RESULT_COLUMNS if c in table]].copy()
    shown.insert(0, "point", labels)
    return _table_html(shown)


def _reference_section(table: pd.DataFrame, reference: dict) -> tuple:
    """Each baseline's time to target over the method's, beside the ratio the source reports; then the source's
    other claims, verbatim."""
    done = table[table["status"] == "completed"]
    times = done.groupby("algorithm.name")["time_to_target_s"].mean()
    method = reference["method"]
    own = times.get(method, math.nan)
    rows = [{"baseline": baseline, "published speed-up": published,
             "measured speed-up": times.get(baseline, math.nan) / own,
             "baseline's time to target (s)": times.get(baseline, math.nan)}
            for baseline, published in reference["speedup"].items()]
    content = _table_html(pd.DataFrame(rows)) if rows else ""
    if reference["claims"]:
        content += "<p>The source also reports:</p><ul>" + "".join(
            f"<li>{html.escape(claim)}</li>" for claim in reference["claims"]) + "</ul>"
    note = (f"Source: {reference['source']}. Speed-up = the baseline's time to target perplexity / {method}'s "
            f"({_seconds(own) if not math.isnan(own) else 'not reached'} here); above 1 means {method} is faster. "
            "Published figures are for the source's models and hardware: compare the ordering, not the values.")
    return ("Against the published figures", note, content)


def _table_html(table: pd.DataFrame) -> str:
    """Columns that are empty throughout (e.g. scores of runs that decoded nothing) are left out."""
    shown = table.drop(columns=[c for c in ("run_dir",) if c in table]).dropna(axis=1, how="all")
    return shown.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}")


def _inline_svg(paths: list[Path]) -> str:
    """The SVG file's markup without its XML prolog, so the page needs no other file."""
    svg = next(p for p in paths if p.suffix == ".svg").read_text()
    return svg[svg.index("<svg"):]


def _html(title: str, sections: list) -> str:
    body = []
    for heading, note, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if note:
            body.append(f"<p>{html.escape(note)}</p>")
        if isinstance(content, str):
            body.append(content)
        elif content:
            body.append(f'<figure>{_inline_svg(content)}<figcaption>{html.escape(content[0].stem)}.png / .svg'
                        "</figcaption></figure>")
        else:
            body.append("<p><em>No data to draw.</em></p>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}figure{margin:0}figure svg{max-width:100%;height:auto}"
             "figcaption{font-size:12px;color:#777}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")

