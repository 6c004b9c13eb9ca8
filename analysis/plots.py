"""Report-ready figures drawn from the tables of run directories only."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works headless and on laptops
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter  # noqa: E402

from analysis.load import Run, load_run  # noqa: E402

STYLE = {
    "font.size": 9,
    "axes.labelsize": 10,
    "axes.titlesize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
}

# Fixed colours, in protocol order, so a kind looks the same in every figure.
KIND_COLORS = {
    "client_fwd": "#1f77b4",
    "upload": "#ff7f0e",
    "server_queue": "#bdbdbd",
    "server_step": "#d62728",
    "download": "#ffbb78",
    "client_bwd": "#17becf",
    "adapter_upload": "#2ca02c",
    "aggregate": "#9467bd",
    "broadcast": "#98df8a",
    "eval": "#8c564b",
    "central_step": "#e377c2",
}
SPARE_COLORS = ["#7f7f7f", "#bcbd22", "#c5b0d5", "#f7b6d2", "#c49c94", "#dbdb8d", "#9edae5"]
# Waiting is not work: drawn thin so it does not hide the work sharing its row.
WAIT_KINDS = {"server_queue"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _time_unit(max_s: float) -> tuple[float, str]:
    """Seconds per unit, and its name, so axis numbers stay short."""
    if max_s >= 10 * 3600:
        return 3600.0, "h"
    if max_s >= 600:
        return 60.0, "min"
    if 0 < max_s < 1:
        return 1e-3, "ms"
    return 1.0, "s"


def _save(fig: plt.Figure, out_base: Path) -> list[Path]:
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_base.with_name(f"{out_base.name}.{ext}") for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _run_labels(runs: list[Run]) -> list[str]:
    """Algorithm names tell runs apart unless two runs share one; then run names."""
    algorithms = [run.algorithm for run in runs]
    labels = algorithms if len(set(algorithms)) == len(runs) else [run.name for run in runs]
    return [
        f"{label} (failed)" if run.summary.get("status") == "failed" else label
        for label, run in zip(labels, runs)
    ]


def plot_perplexity(runs: list[Run] | Run, out_base: Path) -> list[Path]:
    """Perplexity against simulated time, one line per run; [] when no run has a round."""
    runs = [runs] if isinstance(runs, Run) else list(runs)
    curves = []
    for run, label in zip(runs, _run_labels(runs)):
        if run.rounds.empty or "eval_ppl" not in run.rounds:
            continue
        rows = run.rounds[run.rounds["eval_ppl"] > 0].sort_values("sim_time_s")
        if not rows.empty:
            curves.append((label, rows))
    if not curves:
        return []

    all_rows = pd.concat([rows for _, rows in curves])
    scale, unit = _time_unit(all_rows["sim_time_s"].max())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.2))
        for i, (label, rows) in enumerate(curves):
            ax.plot(
                rows["sim_time_s"] / scale,
                rows["eval_ppl"],
                marker=MARKERS[i % len(MARKERS)],
                markersize=4,
                linewidth=1.5,
                label=label,
            )
        if all_rows["eval_ppl"].max() > 10 * all_rows["eval_ppl"].min():
            ax.set_yscale("log")
            # Plain numbers (20, 30) read better than 2x10^1 on a perplexity axis.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(
                LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
            )
        ax.set_xlabel(f"Simulated time ({unit})")
        ax.set_ylabel("Evaluation perplexity")
        ax.grid(True, which="major", alpha=0.3)
        if len(curves) <= 4:
            ax.legend(loc="best", frameon=False)
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, out_base)


def _resource_key(resource: str) -> tuple:
    """Server rows first, then each client with its links (device, up, down), then the rest."""
    match = re.fullmatch(r"client(\d+)(?:\.(up|down))?", resource)
    if resource.startswith("server"):
        return (0, 0, 0, resource)
    if match:
        link_order = {None: 0, "up": 1, "down": 2}[match.group(2)]
        return (1, int(match.group(1)), link_order, resource)
    return (2, 0, 0, resource)


def _kind_colors(kinds: list[str]) -> dict[str, str]:
    """Known kinds keep their fixed colour; unknown ones take spare colours in name order."""
    unknown = sorted(k for k in kinds if k not in KIND_COLORS)
    spare = {k: SPARE_COLORS[i % len(SPARE_COLORS)] for i, k in enumerate(unknown)}
    return {k: KIND_COLORS.get(k) or spare[k] for k in kinds}


def _first_rounds(events: pd.DataFrame, rounds: int) -> pd.DataFrame:
    """Events of the first `rounds` training rounds (round 0, the initial evaluation, is skipped
    when training rounds exist)."""
    numbers = sorted(events["round"].unique())
    if len(numbers) > 1 and numbers[0] == 0:
        numbers = numbers[1:]
    return events[events["round"].isin(numbers[:rounds])]


def plot_timeline(run: Run, out_base: Path, rounds: int = 2) -> list[Path]:
    """Gantt chart of the first rounds, one row per device or link; [] when there are no events."""
    if run.events.empty:
        return []
    events = _first_rounds(run.events, rounds)
    resources = sorted(events["resource"].astype(str).unique(), key=_resource_key)
    row_of = {resource: i for i, resource in enumerate(resources)}
    drawn = events[events["end_s"] > events["start_s"]]
    order = list(KIND_COLORS) + sorted(set(drawn["kind"]) - set(KIND_COLORS))
    kinds = [k for k in order if k in set(drawn["kind"])]
    colors = _kind_colors(kinds)

    scale, unit = _time_unit(events["end_s"].max())
    t_min, t_max = events["start_s"].min() / scale, events["end_s"].max() / scale
    # Brief events (aggregation, small transfers) get a hairline width so they stay visible.
    min_width = (t_max - t_min) * 0.004
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.0, max(2.4, 0.8 + 0.3 * len(resources))))
        for (resource, kind), group in drawn.groupby(["resource", "kind"]):
            wait = kind in WAIT_KINDS
            height = 0.3 if wait else 0.7
            ax.broken_barh(
                list(zip(
                    group["start_s"] / scale,
                    ((group["end_s"] - group["start_s"]) / scale).clip(lower=min_width),
                )),
                (row_of[str(resource)] - height / 2, height),
                facecolors=colors[kind],
                edgecolor="white" if not wait else "none",
                linewidth=0.3,
                zorder=1 if wait else 2,
            )
        round_ends = events.groupby("round")["end_s"].max().sort_index()
        for number, end in round_ends.items():
            ax.axvline(end / scale, color="black", linestyle="--", linewidth=0.7, zorder=3)
            ax.annotate(
                f"end of round {number}",
                xy=(end / scale, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(-2, 2),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=9,
            )
        ax.set_yticks(range(len(resources)), resources)
        ax.set_ylim(len(resources) - 0.5, -0.5)  # server at the top
        margin = (t_max - t_min) * 0.01
        ax.set_xlim(t_min - margin, t_max + margin)
        ax.set_xlabel(f"Simulated time ({unit})")
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(
            handles=[Patch(facecolor=colors[k], label=k) for k in kinds],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
        fig.tight_layout()
        return _save(fig, out_base)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write perplexity and timeline figures into RUN/plots/; a figure without data is skipped,
    so a missing path in the result means there was nothing to plot."""
    run = load_run(run_dir)
    plots = run.path / "plots"
    return plot_perplexity(run, plots / "perplexity") + plot_timeline(run, plots / "timeline")
