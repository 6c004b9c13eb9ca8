"""Wire format: one JSON header frame, then one raw buffer per tensor. Never pickle.

Header of a request: {"v": 1, "op": str, "id": int, "client": int | null, "args": {...},
"tensors": [{"name", "dtype", "shape"}, ...]}. A reply carries "ok" (and "error" when false)
and "result" in place of "op", "client" and "args".
"""

import json
import math
from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = 1
DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint8", "bool"}
MAX_HEADER_BYTES = 1 << 20
# What grows with the run (a worker's state: training/roles.py, dump_state) goes in pages (page) whose headers list
# tensors for at most PAGE_HEADER_BYTES, well under the cap, its JSON as chunks (json_arrays) of at most
# JSON_CHUNK_BYTES, well under any run's frame limit.
PAGE_HEADER_BYTES = MAX_HEADER_BYTES // 2
JSON_CHUNK_BYTES = 1 << 18
PAGE_DATA_BYTES = 16 << 20  # a checkpoint's page (dump_state, load_state): the coordinator holds about one
JSON_PREFIX = "json."


class ProtocolError(ValueError):
    """A frame sequence that does not follow the wire format."""


@dataclass
class Message:
    header: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the tensor buffers: what a deployment would put on the link."""
        return sum(t.nbytes for t in self.tensors.values())


def encode(header: dict, tensors: dict[str, np.ndarray] | None = None) -> list:
    """Frames for zmq send_multipart(copy=False): the buffers go out without copies.

    Flattened first (a view of a contiguous array): memoryview cannot cast a multi-dimensional zero-size view.
    """
    arrays = {name: np.asarray(t, order="C") for name, t in (tensors or {}).items()}  # keeps 0-d shapes
    for name, array in arrays.items():
        if array.dtype.name not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {array.dtype.name} cannot cross the wire")
    full = dict(header, v=PROTOCOL_VERSION)
    full["tensors"] = [{"name": n, "dtype": a.dtype.name, "shape": list(a.shape)} for n, a in arrays.items()]
    return [json.dumps(full, separators=(",", ":")).encode()] + [memoryview(a.reshape(-1)).cast("B") for a in arrays.values()]


def frame_bytes(frames: list) -> int:
    """The largest frame of a message as encode gives it (bytes and memoryviews)."""
    return max((len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames), default=0)


def decode(frames: list, required: tuple[str, ...] = ()) -> Message:
    """Parse and validate a frame sequence; every problem is a ProtocolError naming it."""
    if not frames:
        raise ProtocolError("empty message")
    raw = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    for key in required:
        if key not in header:
            raise ProtocolError(f"header lacks {key!r}")
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(specs) if isinstance(specs, list) else '?'} tensors "
                            f"but {len(frames) - 1} buffers followed")
    tensors = {}
    for spec, frame in zip(specs, frames[1:]):
        tensors.update(_tensor(spec, frame, tensors))
    return Message(header, tensors)


def _tensor(spec, frame, seen: dict) -> dict[str, np.ndarray]:
    if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
        raise ProtocolError(f"tensor entry {spec!r} needs name, dtype and shape")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or name in seen:
        raise ProtocolError(f"tensor name {name!r} is not a new string")
    if dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if buffer.nbytes != expected:
        raise ProtocolError(f"tensor {name!r}: {buffer.nbytes} bytes, shape and dtype need {expected}")
    return {name: np.frombuffer(buffer, dtype=dtype).reshape(shape)}


def json_arrays(value) -> dict[str, np.ndarray]:
    """A JSON value as uint8 arrays "json.<i>" of at most JSON_CHUNK_BYTES each: JSON that grows with what it
    describes then travels in pages, as tensors do, and no frame outgrows the run's frame limit."""
    data = np.frombuffer(bytearray(json.dumps(value, separators=(",", ":")).encode()), dtype=np.uint8)
    return {f"{JSON_PREFIX}{i}": data[start:start + JSON_CHUNK_BYTES]
            for i, start in enumerate(range(0, len(data), JSON_CHUNK_BYTES))}


def from_json_arrays(arrays: dict[str, np.ndarray]) -> tuple[object, dict[str, np.ndarray]]:
    """(the value json_arrays made, the other arrays) of arrays that hold its chunks among others."""
    chunks = [arrays[f"{JSON_PREFIX}{i}"] for i in range(sum(name.startswith(JSON_PREFIX) for name in arrays))]
    rest = {name: array for name, array in arrays.items() if not name.startswith(JSON_PREFIX)}
    return json.loads(b"".join(chunk.tobytes() for chunk in chunks)), rest


def page(arrays: dict, start: int, budget: int = PAGE_HEADER_BYTES,
         data_budget: int = PAGE_DATA_BYTES) -> tuple[dict, int | None]:
    """The arrays from position `start` on, in the dict's order, whose header entries fit in `budget` bytes and
    whose data fits in `data_budget` (at least one array), and the position of the next page (None after the
    last): a message of many arrays goes as several whose headers stay bounded, and whose receiver holds one page
    of data at a time. Arrays are anything with a shape and nbytes (torch tensors too, so that a caller converts
    only its page's); each entry is counted with the longest dtype name."""
    names = list(arrays)
    end, used, data = start, 0, 0
    while end < len(names):
        array = arrays[names[end]]
        entry = len(json.dumps({"name": names[end], "dtype": "float64", "shape": list(array.shape)},
                               separators=(",", ":"))) + 1  # and its comma
        if end > start and (used + entry > budget or data + array.nbytes > data_budget):
            break
        used += entry
        data += array.nbytes
        end += 1
    return {name: arrays[name] for name in names[start:end]}, end if end < len(names) else None
