"""Progress of long work (a run's rounds, a sweep's points): a live line on a terminal, plain lines when the
output goes to a file or a CI log, where a redrawn line would only leave escape codes behind."""

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def clock(seconds: float | None) -> str:
    """h:mm:ss or m:ss; '?' before there is anything to estimate from."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLine:
    """`title done/total  wall  ETA  status`. The ETA assumes the remaining items take as long as those finished
    since this line started, or since the last update that reported no new item (a run's round 0, the evaluation
    after start-up); items done before it, such as a resumed sweep's, took no time here."""

    def __init__(self, title: str, total: int, done: int = 0, enabled: bool = True):
        self.title, self.total, self.done, self.first = title, total, done, done
        self.started = self.eta_from = time.monotonic()
        self.console = Console(stderr=True, highlight=False) if enabled else None
        self.live = None
        if self.console is not None and self.console.is_terminal:
            self.live = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("wall"), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                                 console=self.console)
            self.task = self.live.add_task(title, total=total, completed=done, status="")
            self.live.start()

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def eta_s(self) -> float | None:
        finished = self.done - self.first
        if finished <= 0:
            return None
        return (time.monotonic() - self.eta_from) / finished * (self.total - self.done)

    def update(self, done: int, status: str = "", keep: bool = False) -> None:
        """Move the line to `done` items; `keep` also leaves this state behind as a line of its own on a terminal
        (a finished round or point), where the live line is redrawn in place."""
        self.done = done
        if done == self.first:
            self.eta_from = time.monotonic()
        eta = f"ETA {clock(self.eta_s())}  {status}".rstrip()
        line = f"{self.title} {done}/{self.total}  wall {clock(time.monotonic() - self.started)}  {eta}"
        if self.live is not None:
            self.live.update(self.task, completed=done, status=eta)
            if keep:
                self.console.print(line, markup=False, soft_wrap=True)
        elif self.console is not None:
            self.console.print(line, markup=False, soft_wrap=True)

    def say(self, line: str) -> None:
        """A message of its own: above the live line on a terminal, a plain line elsewhere."""
        if self.console is not None:
            self.console.print(line, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
