"""Progress of runs and sweeps: plain lines off a terminal, a live line on one, and an ETA from finished items."""

import pytest

from hsplit_sim.experiment import progress
from hsplit_sim.experiment.progress import ProgressLine, clock


def test_clock():
    assert [clock(s) for s in (None, 0, 59.6, 61, 3600, 3725)] == ["?", "0:00", "1:00", "1:01", "1:00:00", "1:02:05"]


@pytest.fixture
def fake_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_plain_lines_and_eta_from_items_finished_here(capsys, fake_time, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    line = ProgressLine("sweep s: point", total=10, done=4)  # 4 done before this line started
    fake_time[0] += 30
    line.update(4, "started p")  # nothing new finished: the ETA is counted from here
    fake_time[0] += 60
    line.update(6, "p completed")
    line.close()
    out = capsys.readouterr().err.splitlines()
    assert out == ["sweep s: point 4/10  wall 0:30  ETA ?  started p",
                   "sweep s: point 6/10  wall 1:30  ETA 2:00  p completed"]  # 60 s for 2 items, 4 left


def test_live_line_on_a_terminal_keeps_finished_items(capsys, fake_time, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    with ProgressLine("run: round", total=3) as line:
        assert line.live is not None
        line.update(0, "eval ppl 20.00")
        fake_time[0] += 10
        line.update(1, "eval ppl 10.00", keep=True)
    err = capsys.readouterr().err
    assert "run: round 1/3  wall 0:10  ETA 0:20  eval ppl 10.00" in err
    assert "run: round 0/3" not in err.replace("\x1b", "")  # not kept: only drawn live


def test_disabled_prints_nothing(capsys):
    line = ProgressLine("x", total=2, enabled=False)
    line.update(1, "y", keep=True)
    line.say("z")
    assert capsys.readouterr().err == ""
