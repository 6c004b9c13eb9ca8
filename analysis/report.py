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

from analysis.figures import (  # noqa: E402
    RUN_FIGURES, _breakdown_bars, _bytes_lines, _energy_bars, _mean_breakdown, _memory_bars, report_figure)
from analysis.load import Run, load_run  # noqa: E402
from analysis.plots import STYLE, _legend_and_layout, _save, _time_unit  # noqa: E402
from hsplit_sim.results import GENERATION_METRICS  # noqa: E402

METRICS = {"final_eval_ppl": "Final evaluation perplexity", "time_to_target_s": "Time to target perplexity"}
TIMING_METRICS = {"sim_time_s": "Simulated time"}  # a timing-only sweep trained nothing: no perplexity
RESULT_COLUMNS = ("status", "final_eval_ppl", "time_to_target_s", "sim_time_s", "bytes_up", "bytes_down",
                  "energy_j", "reported_share", *GENERATION_METRICS)
MAX_LINES = 8  # more curves than this on one axis stop being readable


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


# --- single runs ------------------------------------------------------------------------------------------------

def _run_sections(run: Run, out: Path) -> list:
    summary = pd.DataFrame({"value": {k: v for k, v in run.summary.items() if not isinstance(v, (dict, list))}})
    return [("Summary", None, summary.to_html(border=0, float_format=lambda v: f"{v:.6g}")),
            *[(figure.title, *report_figure(run, figure, out / figure.name)) for figure in RUN_FIGURES],
            ("Rounds", None, run.rounds.to_html(index=False, border=0, float_format=lambda v: f"{v:.6g}"))]


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

