"""Energy each client's device spends in a round: the time in each power state times the device's power there.

A client's device computes during the events on its device, sends during those on its uplink and receives
during those on its downlink; the rest of the round (waiting for the server, for other clients at the
barrier, or sitting the round out) it idles. Devices without power figures get no rows.
"""

from collections import defaultdict

STATES = {"device": "compute", "uplink": "transmit", "downlink": "receive"}


def round_energy(round_index: int, events: list[tuple], resources: dict[str, tuple[str, int]], clients,
                 start: float, end: float) -> list[dict]:
    """Rows (round, client, seconds and joules per state, joules in all) from one round's event tuples
    (results.EVENT_COLUMNS order); `resources` maps a resource to (kind, owner)."""
    busy: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        kind, owner = resources.get(event[3], ("", -1))
        if event[0] == round_index and owner >= 0 and kind in STATES:
            busy[owner][STATES[kind]] += event[5] - event[4]
    rows = []
    for client in clients:
        power = client.device.power_w
        if power is None:
            continue
        seconds = {state: busy[client.index][state] for state in ("compute", "transmit", "receive")}
        seconds["idle"] = max(0.0, (end - start) - sum(seconds.values()))
        joules = {state: seconds[state] * getattr(power, state) for state in seconds}
        rows.append({"round": round_index, "client": client.index,
                     **{f"{state}_s": value for state, value in seconds.items()},
                     **{f"{state}_j": value for state, value in joules.items()},
                     "energy_j": sum(joules.values())})
    return rows
