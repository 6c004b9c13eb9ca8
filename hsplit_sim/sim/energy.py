"""Energy each client's device spends in a round: the time in each power state times the device's power there.

A client's device computes while it runs its segment or merges an update, sends while its uplink carries its
data and receives while its downlink does (the fleet counts these seconds as it simulates them: ClientNode.busy);
the rest of the round (waiting for the server, for other clients, or sitting the round out) it idles. Devices
without power figures get no rows.
"""

STATES = ("compute", "transmit", "receive")


def round_energy(round_index: int, busy: dict[int, list[float]], clients, seconds: float) -> list[dict]:
    """Rows (round, client, seconds and joules per state, joules in all) from each client's busy seconds
    (computing, sending, receiving) in a round of `seconds`."""
    rows = []
    for client in clients:
        power = client.device.power_w
        if power is None:
            continue
        spent = dict(zip(STATES, busy[client.index]))
        spent["idle"] = max(0.0, seconds - sum(spent.values()))
        joules = {state: spent[state] * getattr(power, state) for state in spent}
        rows.append({"round": round_index, "client": client.index,
                     **{f"{state}_s": value for state, value in spent.items()},
                     **{f"{state}_j": value for state, value in joules.items()},
                     "energy_j": sum(joules.values())})
    return rows
