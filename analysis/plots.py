"""Report-ready figures drawn from the tables of run directories only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works headless and on laptops
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatter  # noqa: E402

from analysis.load import Run  # noqa: E402
from hsplit_sim.results import RESOURCE_KINDS, WAIT_KINDS  # noqa: E402

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
    "data_upload": "#aec7e8",
    "importance_upload": "#ad494a",
}
SPARE_COLORS = ["#7f7f7f", "#bcbd22", "#c5b0d5", "#f7b6d2", "#c49c94", "#dbdb8d", "#9edae5"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
SMALL_FLEET = 8  # a timeline shows every client of a fleet this small
MAX_LANES = 36  # beyond a few dozen rows a timeline stops being readable (and cheap to draw)
LONG_LABEL = 40  # characters of a legend label beyond which the legend goes below the axes


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
    """PNG and SVG, cropped to what is drawn. The layout is done and the crop measured once for both: left to
    savefig, each file would lay out every text again first, which costs as much as drawing it."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_base.with_name(f"{out_base.name}.{ext}") for ext in ("png", "svg")]
    crop = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)  # 0.1 in: savefig's own pad_inches
    fig.set_layout_engine(None)  # tight_layout leaves a placeholder engine that makes savefig lay out again
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches=crop)
    plt.close(fig)
    return paths


def _run_labels(runs: list[Run]) -> list[str]:
    """Algorithm names tell runs apart unless two runs share one; then run names."""
    algorithms = [run.algorithm for run in runs]
    labels = algorithms if len(set(algorithms)) == len(runs) else [run.name for run in runs]
    return [
        f"{label} (failed)" if run.summary.get("status") == "failed"
        else f"{label} (projected)" if run.summary.get("trajectory") == "projected" else label
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
        if any(run.summary.get("trajectory") == "projected" for run in runs):
            ax.set_title("Projected: a trained run's perplexity per round, this system's time per round",
                         fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        if len(curves) <= 4:
            ax.legend(loc="best", frameon=False)
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        return _save(fig, out_base)


def _lane_key(resource) -> tuple:
    """A row of the resources table's place in the timeline: the server first, then each client's device,
    uplink and downlink, then shared resources such as a wireless medium."""
    section = 0 if resource.kind == "server" else 1 if resource.client >= 0 else 2
    kind = RESOURCE_KINDS.index(resource.kind) if resource.kind in RESOURCE_KINDS else len(RESOURCE_KINDS)
    return (section, resource.client, kind, resource.resource)


def _kind_colors(kinds: list[str]) -> dict[str, str]:
    """Known kinds keep their fixed colour; unknown ones take spare colours in name order."""
    unknown = sorted(k for k in kinds if k not in KIND_COLORS)
    spare = {k: SPARE_COLORS[i % len(SPARE_COLORS)] for i, k in enumerate(unknown)}
    return {k: KIND_COLORS.get(k) or spare[k] for k in kinds}


def _first_rounds(run: Run, rounds: int) -> list[int]:
    """The first `rounds` training rounds with events, after round 0 where work came before training
    (HSplitLoRA's importance probe); round 0 with the initial evaluation alone is skipped when training rounds
    exist."""
    numbers = run.round_numbers("events")
    if len(numbers) > 1 and numbers[0] == 0:
        before = run.read("events", ["kind"], rounds=[0])
        prepared = bool((before["kind"].astype(str) != "eval").any())
        return [0] * prepared + numbers[1:rounds + 1]
    return numbers[:rounds]


def client_classes(run: Run) -> pd.DataFrame:
    """Per client (the index): its device and class, "device / link" (clients alike in both run alike); empty
    when the run has no clients table. Only the table's first round is read: a client's device never changes."""
    columns = ["client", "device", "link"]
    clients = run.read("clients", columns, rounds=run.round_numbers("clients")[:1] or None)
    if clients.empty or "device" not in clients:
        return pd.DataFrame(columns=["device", "class"])
    clients = clients.drop_duplicates("client").set_index("client").sort_index()
    device = clients["device"].astype(str)
    return pd.DataFrame({"device": device, "class": device + " / " + clients["link"].astype(str)
                         if "link" in clients else device})


def _busy_seconds(events: pd.DataFrame) -> pd.Series:
    """Per client, the seconds its own events took (work, transfers, waiting for the server): how long its local
    steps keep it from the round's barrier, which is what makes it slow."""
    mine = events["client"].to_numpy() >= 0
    return (events["end_s"] - events["start_s"])[mine].groupby(events["client"][mine]).sum()


def _pick_clients(busy: pd.Series, classes: pd.Series, most: int) -> tuple[list[tuple[int, str]], str]:
    """(client, role) pairs: the slowest and the fastest client of each class, in fleet order; only the
    slowest when that does not fit in `most` clients, and then only the slowest classes. Also what they are."""
    table = pd.DataFrame({"busy": busy, "cls": classes.reindex(busy.index).fillna("unknown device")})
    by_class = table.groupby("cls", sort=False)["busy"]
    slowest, fastest, sizes = by_class.idxmax(), by_class.idxmin(), by_class.size()
    n_classes = len(slowest)
    if 2 * n_classes <= most:
        picks = []
        for cls, k in slowest.items():
            if sizes[cls] == 1:
                picks.append((k, f"the only {cls}"))
            elif table.at[k, "busy"] == table.at[fastest[cls], "busy"]:
                picks.append((k, f"one of {sizes[cls]:,} alike {cls}"))
            else:
                picks += [(k, f"slowest of {sizes[cls]:,} {cls}"), (fastest[cls], f"fastest of {sizes[cls]:,} {cls}")]
        what = "the slowest and fastest of each device class"
    else:
        shown = set(table.loc[slowest, "busy"].nlargest(most).index)
        picks = [(k, f"slowest of {sizes[cls]:,} {cls}") for cls, k in slowest.items() if k in shown]
        what = ("the slowest of each device class" if len(picks) == n_classes
                else f"the slowest of the {len(picks)} slowest of {n_classes} device classes")
    return picks, what


def _lanes(run: Run, events: pd.DataFrame) -> tuple[list[str], list[str], str]:
    """Rows of the timeline (resources the events use, as the resources table says what each is and who owns
    it), their labels, and which clients they show. Every client of a small fleet; of a larger one the server
    and the slowest and fastest client of each device class, with their links."""
    used = run.resources[run.resources["resource"].isin({str(r) for r in events["resource"].unique()})]
    rows = sorted(used.itertuples(index=False), key=_lane_key)
    own: dict[int, list] = {}
    for row in rows:
        if row.client >= 0:
            own.setdefault(int(row.client), []).append(row)
    n_clients = max(run.summary.get("n_clients") or 0, len(own))
    if len(own) <= SMALL_FLEET:
        lanes = [row.resource for row in rows]
        return lanes, lanes, _clients_text(len(own), n_clients)
    servers = [row.resource for row in rows if row.kind == "server"]
    shared = [row.resource for row in rows if row.client < 0 and row.kind != "server"]
    picks, why = _pick_clients(_busy_seconds(events), client_classes(run)["class"],
                               max(1, (MAX_LANES - len(servers) - len(shared)) // max(map(len, own.values()))))
    lanes, labels = list(servers), list(servers)
    for k, role in picks:
        for row in own.get(k, []):
            lanes.append(row.resource)
            labels.append(f"{row.resource} ({role})" if row.kind == "device" else row.resource)
    return lanes + shared, labels + shared, f"{_clients_text(len(picks), n_clients)}: {why}"


def _clients_text(shown: int, n_clients: int) -> str:
    if shown == n_clients:
        return "the only client" if shown == 1 else f"all {shown} clients"
    return f"{shown} of {n_clients:,} clients" if shown else "no client events"


def _bars(starts: np.ndarray, ends: np.ndarray, min_width: float) -> list[tuple[float, float]]:
    """(start, width) bars at least `min_width` wide, those that would overlap as drawn joined into one: a lane
    shared by a thousand clients (the server) then draws as a few bars, not thousands of overlapping slivers,
    while bars that merely touch stay apart."""
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    reach = np.maximum.accumulate(np.maximum(ends[order], starts + min_width))
    first = np.flatnonzero(np.r_[True, starts[1:] >= reach[:-1]])
    last = np.r_[first[1:] - 1, len(starts) - 1]
    return list(zip(starts[first], reach[last] - starts[first]))


def plot_timeline(run: Run, out_base: Path, rounds: int = 2) -> list[Path]:
    """Gantt chart of the first rounds, one row per device or link (of every client, or of a few chosen ones in
    a large fleet, as the title says); [] when there are no events. Only the rounds drawn are read."""
    numbers = _first_rounds(run, rounds)
    if not numbers:
        return []
    events = run.read("events", ["round", "client", "kind", "resource", "start_s", "end_s"], rounds=numbers)
    if events.empty:
        return []
    lanes, labels, what = _lanes(run, events)
    row_of = {resource: i for i, resource in enumerate(lanes)}
    round_ends = events.groupby("round")["end_s"].max().sort_index()
    scale, unit = _time_unit(events["end_s"].max())
    t_min, t_max = events["start_s"].min() / scale, events["end_s"].max() / scale
    events = events[events["resource"].isin(lanes) & (events["end_s"] > events["start_s"])]
    present = set(events["kind"].unique())
    kinds = [k for k in KIND_COLORS if k in present] + sorted(present - set(KIND_COLORS))
    colors = _kind_colors(kinds)

    # Brief events (aggregation, small transfers) get a hairline width so they stay visible.
    min_width = (t_max - t_min) * 0.004
    with plt.rc_context(STYLE):
        # Long lane labels (a chosen client's role) get their own width rather than squeezing the axes.
        width = 7.0 + 0.06 * max(0, max(map(len, labels)) - 15)
        fig, ax = plt.subplots(figsize=(width, max(2.4, 0.8 + 0.3 * len(lanes))))
        for (resource, kind), group in events.groupby(["resource", "kind"], observed=True):
            wait = kind in WAIT_KINDS
            height = 0.3 if wait else 0.7
            ax.broken_barh(
                _bars(group["start_s"].to_numpy() / scale, group["end_s"].to_numpy() / scale, min_width),
                (row_of[str(resource)] - height / 2, height),
                facecolors=colors[kind],
                edgecolor="white" if not wait else "none",
                linewidth=0.3,
                zorder=1 if wait else 2,
            )
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
        ax.set_yticks(range(len(lanes)), labels)
        ax.set_ylim(len(lanes) - 0.5, -0.5)  # server at the top
        margin = (t_max - t_min) * 0.01
        ax.set_xlim(t_min - margin, t_max + margin)
        ax.set_xlabel(f"Simulated time ({unit})")
        ax.set_title(f"{_rounds_text(numbers)}, {what}", loc="left", pad=16)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(
            handles=[Patch(facecolor=colors[k], label=k) for k in kinds],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
        fig.tight_layout()
        return _save(fig, out_base)


def _rounds_text(numbers: list[int]) -> str:
    return f"Round {numbers[0]}" if len(numbers) == 1 else f"Rounds {numbers[0]}–{numbers[-1]}"


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
