"""Read run and sweep directories and draw their figures and reports; needs only pandas and matplotlib, never torch."""

from analysis.load import Run, load_run
from analysis.figures import RUN_FIGURES, plot_run
from analysis.plots import plot_perplexity, plot_timeline
from analysis.report import load_sweep, report

__all__ = ["RUN_FIGURES", "Run", "load_run", "load_sweep", "plot_perplexity", "plot_run", "plot_timeline", "report"]
