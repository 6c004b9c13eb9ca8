"""The run directory's contract, shared by the code that writes runs (experiment/) and the code that reads them
(analysis/): its tables and their columns, the event vocabulary, and its version.

`summary.json` carries `results_version`; directories written before it (version 1) have no resources table,
and `analysis.load` derives one from the resource names those versions used.
"""

RESULTS_VERSION = 2

# Every simulated activity is one row: which round, on behalf of which client (-1: the server's own work),
# what kind of activity, on which resource, when, and the bytes moved or FLOPs computed.
EVENT_COLUMNS = ("round", "client", "kind", "resource", "start_s", "end_s", "bytes", "flops")

# What each kind of event spends time on. "queue" is waiting, not work.
EVENT_KINDS = {
    "client_fwd": "compute", "client_bwd": "compute", "client_step": "compute", "merge": "compute",
    "upload": "upload", "adapter_upload": "upload",
    "download": "download", "broadcast": "download", "resplit": "download",
    "server_queue": "queue",
    "server_step": "server", "aggregate": "server", "central_step": "server", "eval": "server",
}
WAIT_KINDS = frozenset(k for k, category in EVENT_KINDS.items() if category == "queue")

# The resources events name: a client's device and its links, a shared medium, the server. `client` is the
# owner (-1: shared), `name` the catalog entry (device or link), `group` the scenario's client group.
RESOURCE_COLUMNS = ("resource", "kind", "client", "name", "group")
RESOURCE_KINDS = ("device", "uplink", "downlink", "medium", "server")

ROUND_COLUMNS = ("round", "sim_time_s", "wall_time_s", "train_loss", "eval_loss", "eval_ppl", "bytes_up",
                 "bytes_down", "agg_error", "algorithm")
CLIENT_COLUMNS = ("round", "client", "device", "link", "split_layer", "rank", "adapted_weights", "adapter_params",
                  "memory_bytes", "memory_budget_bytes", "n_examples", "status")

# Tables of a run directory: the small ones rewritten after every round, the large ones (events, clients)
# written as parts per round and combined when the run ends.
TABLES = ("rounds", "events", "clients", "resources", "plans", "importance", "generations")
