"""`hsplit-sim sweep`: a base scenario plus axes to vary; every point is one `hsplit-sim run` in its own process.

Each point runs as a separate `python -m hsplit_sim.cli run` process, so a point that crashes (even hard) is
recorded as failed and the others go on, and Ctrl-C reaches each run once, which then writes its summary as
interrupted. Points are validated together before any runs; a point whose devices cannot hold its configuration
(the memory check) fails alone, because in a what-if study "does not fit" is a result, not a typo.

Trajectory reuse (on unless `--no-reuse`): points that share a training key (experiment/trajectory.py: everything
that can change training) train once. The first point of each such group trains; the others run after it as
re-timed points (`runtime.replay_from` the trained run, timing-only, accuracy columns taken from it), and train
anew only if the replay finds a different server order (SplitLoRA). The table's `trajectory` column says which
points trained and which were re-timed.

Modules: `sweepfile` (the file: axes, points, ids), `scheduler` (running points, resume, progress, interrupt),
`executors` (local processes or Ray tasks behind one interface), `table` (the sweep table).
"""

from hsplit_sim.experiment.sweep.scheduler import run_sweep
from hsplit_sim.experiment.sweep.sweepfile import Point, Sweep, load_sweep_file
from hsplit_sim.experiment.sweep.table import point_result, refresh_table

__all__ = ["Point", "Sweep", "load_sweep_file", "point_result", "refresh_table", "run_sweep"]
