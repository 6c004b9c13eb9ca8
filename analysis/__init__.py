"""Read run directories and draw their figures; needs only pandas and matplotlib, never torch."""

from analysis.load import Run, load_run
from analysis.plots import plot_perplexity, plot_run, plot_timeline

__all__ = ["Run", "load_run", "plot_perplexity", "plot_run", "plot_timeline"]
