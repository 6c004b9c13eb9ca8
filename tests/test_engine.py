"""The simulation's clock and event log: the Clockwork runs waits in SimPy's order, a clock moves to an instant to
the bit, and compact split-iteration records expand to the rows they stand for."""

import math

import pyarrow as pa
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplit_sim.experiment.rundir import EVENT_ROW, EVENT_SCHEMA, events_table
from hsplit_sim.sim.engine import SPLIT_KINDS, Clockwork, Environment, IterationShape, Simulation, expanded, rows_in

# Delays with many ties (equal wake-up times are where the order of scheduling decides) and zero waits.
DELAYS = st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.3, 1.0, 1e-9, 7.5]) | st.floats(0, 10), max_size=6),
                  min_size=1, max_size=8)


def waits(i: int, delays: list[float], log: list, clock, timeout):
    for delay in delays:
        log.append((i, clock.now))
        yield timeout(delay)
    log.append((i, clock.now))


@settings(max_examples=200, deadline=None)
@given(delays=DELAYS, start=st.floats(0, 100))
def test_the_clockwork_runs_processes_in_simpys_order_and_ends_them_when_simpy_does(delays, start):
    env, in_simpy = simpy.Environment(initial_time=start), []
    processes = [env.process(waits(i, d, in_simpy, env, env.timeout)) for i, d in enumerate(delays)]
    simpy_ends = []
    for process in processes:
        process.callbacks.append(lambda _: simpy_ends.append(env.now))
    env.run()

    clockwork, on_clockwork = Clockwork(start), []
    ends = clockwork.run([waits(i, d, on_clockwork, clockwork, float) for i, d in enumerate(delays)])
    assert on_clockwork == in_simpy  # every resumption: which process, at what instant, in what order
    assert sorted(ends) == sorted(simpy_ends) and clockwork.now == env.now
    assert ends == [max(t for i, t in in_simpy if i == k) for k in range(len(delays))]


@given(now=st.floats(0, 1e6), ahead=st.floats(0, 1e6))
def test_the_clock_moves_to_the_instant_exactly_and_goes_on_from_there(now, ahead):
    t = now + ahead
    env, fired = Environment(initial_time=now), []
    env.advance_to(t)
    env.timeout(0).callbacks.append(lambda _: fired.append(env.now))
    env.run()
    assert env.now == t and fired == [t]


def test_the_clock_reaches_an_instant_no_timeout_can():
    """now + delay rounds: from 0.8370777361826442 no delay lands on 2.9015489586493897 (the sum of the two
    always rounds to an even last bit), which a run met; advance_to lands there."""
    now, t = 0.8370777361826442, 2.9015489586493897
    delay = t - now
    assert all(now + d != t for d in (math.nextafter(delay, -math.inf), delay, math.nextafter(delay, math.inf)))
    env = Environment(initial_time=now)
    env.advance_to(t)
    assert env.now == t


def test_the_clock_does_not_pass_over_a_scheduled_event_or_go_back():
    env = Environment(initial_time=1.0)
    env.timeout(0.5)
    with pytest.raises(RuntimeError, match="events scheduled"):
        env.advance_to(2.0)
    env.run()
    with pytest.raises(RuntimeError):
        env.advance_to(1.0)


SHAPES = [IterationShape(k, (f"client{k}", f"client{k}.up", "server", "server", f"client{k}.down", f"client{k}"),
                         (0, 100 + k, 0, 0, 50 + k, 0),
                         ((1.0 + k, 0.0, 0.0, 2.0, 0.0, 3.0), (1.5 + k, 0.0, 0.0, 2.5, 0.0, 3.5)), 0.01 * k + 1e-3)
          for k in range(4)]
ROW = st.tuples(st.integers(0, 3), st.integers(-1, 3), st.sampled_from(["eval", "aggregate", "adapter_upload"]),
                st.sampled_from(["server", "client1.up", "client9"]), st.floats(0, 5), st.floats(0, 5),
                st.integers(0, 10 ** 9), st.floats(0, 1e12))
RECORD = st.builds(lambda shape, r, probe, times: (shape, r, probe, *sorted(times)), st.integers(0, len(SHAPES) - 1),
                   st.integers(0, 3), st.booleans(), st.lists(st.floats(0, 5), min_size=6, max_size=6))


@settings(max_examples=100, deadline=None)
@given(events=st.lists(ROW | RECORD, max_size=40))
def test_a_round_of_rows_and_records_becomes_the_table_of_their_rows_in_order(events):
    rows = list(expanded(events, SHAPES))
    assert len(rows) == rows_in(events)
    expected = pa.Table.from_arrays(pa.array(rows, type=EVENT_ROW).flatten(), schema=EVENT_SCHEMA)
    assert events_table(events, SHAPES).equals(expected)


def test_a_record_stands_for_its_six_activities():
    shape = SHAPES[1]
    (r, k, kind, resource, start, end, nbytes, flops), *rest = expanded([(1, 2, True, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)],
                                                                         SHAPES)
    assert (r, k, kind, resource, start, end, nbytes, flops) == (2, 1, "client_fwd", "client1", 1.0, 1.0 + shape.fwd_s,
                                                                   0, 2.5)
    assert [row[2] for row in rest] == list(SPLIT_KINDS[1:])
    assert [(row[4], row[5]) for row in rest] == [(1.0 + shape.fwd_s, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 5.0),
                                                  (5.0, 6.0)]
    assert [row[6] for row in rest] == [101, 0, 0, 51, 0] and [row[7] for row in rest] == [0.0, 0.0, 2.5, 0.0, 3.5]


def test_the_simulation_counts_a_record_as_six_events_and_numbers_shapes_until_they_are_taken():
    sim = Simulation(1)
    sim.record(0, -1, "eval", "server", 0.0, 0.0)
    assert [sim.shape_number(SHAPES[2]), sim.shape_number(SHAPES[0]), sim.shape_number(SHAPES[2])] == [0, 1, 0]
    sim.events.append((1, 1, False, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0))
    assert [row[1] for row in sim.rows()] == [-1] + [0] * 6  # the record's shape, SHAPES[0]
    events, shapes = sim.take_events()
    assert sim.n_events == 7 and rows_in(events) == 7 and shapes == [SHAPES[2], SHAPES[0]] and not sim.events
    assert sim.shape_number(SHAPES[0]) == 0  # numbered afresh
