"""Read run and sweep directories and draw their figures and reports; needs only pandas and matplotlib, never torch."""

from analysis.load import Run, load_run
from analysis.plots import plot_perplexity, plot_run, plot_timeline
from analysis.report import load_sweep, report

__all__ = ["Run", "load_run", "load_sweep", "plot_perplexity", "plot_run", "plot_timeline", "report"]
