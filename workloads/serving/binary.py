"""The Open Inference Protocol's binary tensor extension, read strictly and turned into the JSON body it stands for.

A client such as tritonclient sends `Inference-Header-Content-Length: N`: the first N bytes of the body are the
JSON request, and each input whose `parameters.binary_data_size` is set has its data in the bytes after it, in
input order (fixed-size types little-endian, `BYTES` as a 4-byte little-endian length before each element).
`json_body(body, header)` checks all of it (the length header's digits, the JSON, each input's shape against its
byte count, no byte short or left over) and returns the equivalent JSON body, so one decoder
(workloads/serving/decoding.py) checks every request whatever its encoding. A NaN in a float tensor is how such
a client says "missing": it becomes null, which the decoder accepts only where the column may be missing. An
infinity is refused here, naming the input. Every problem is a `BinaryRequestError`, answered 400.
"""

from __future__ import annotations

import math
import struct
from typing import Any

# Open Inference Protocol datatypes of fixed size -> struct format (little-endian).
_FIXED = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
          "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d"}


class BinaryRequestError(ValueError):
    """A malformed binary-extension request; the message names the header or the input."""


def header_length(raw: bytes | str, body_size: int) -> int:
    """The JSON header's length from `Inference-Header-Content-Length`: decimal digits, within the body."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if not text.isascii() or not text.strip().isdigit() or len(text.strip()) > 12:
        raise BinaryRequestError("header Inference-Header-Content-Length must be the JSON header's length in bytes "
                                 "(decimal digits)")
    n = int(text.strip())
    if not 0 < n <= body_size:
        raise BinaryRequestError(f"header Inference-Header-Content-Length is {n}, but the body has {body_size} "
                                 "bytes; it must be between 1 and the body's size")
    return n


def _elements(name: str, shape: Any, limit: int) -> int:
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise BinaryRequestError(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    if count > limit:
        raise BinaryRequestError(f"input {name!r}: shape {shape} has {count} elements; at most {limit}")
    return count


def _decode(name: str, datatype: str, count: int, data: bytes) -> list:
    if datatype == "BYTES":
        out, at = [], 0
        for i in range(count):
            if at + 4 > len(data):
                raise BinaryRequestError(f"input {name!r}: element {i}'s length runs past binary_data_size")
            (size,) = struct.unpack_from("<I", data, at)
            at += 4
            if at + size > len(data):
                raise BinaryRequestError(f"input {name!r}: element {i} runs past binary_data_size")
            try:
                out.append(data[at:at + size].decode("utf-8"))
            except UnicodeDecodeError:
                raise BinaryRequestError(f"input {name!r}: element {i} is not UTF-8 text") from None
            at += size
        if at != len(data):
            raise BinaryRequestError(f"input {name!r}: {len(data) - at} bytes left after {count} elements")
        return out
    fmt = _FIXED[datatype]
    width = struct.calcsize(fmt)
    if len(data) != count * width:
        raise BinaryRequestError(f"input {name!r}: binary_data_size {len(data)} does not match shape of {count} "
                                 f"{datatype} elements ({count * width} bytes)")
    values = list(struct.unpack(f"<{count}{fmt}", data))
    if datatype.startswith("FP"):
        for i, v in enumerate(values):
            if math.isinf(v):
                raise BinaryRequestError(f"input {name!r}: element {i} is {v}, not a finite number")
        values = [None if math.isnan(v) else v for v in values]  # NaN: the client's way to say missing
    return values


def json_body(body: bytes, raw_header: bytes | str, max_elements: int) -> dict[str, Any]:
    """The JSON request a binary-extension body stands for, every binary input's data inlined."""
    import orjson

    n = header_length(raw_header, len(body))
    try:
        request = orjson.loads(body[:n])
    except orjson.JSONDecodeError:
        raise BinaryRequestError("the first Inference-Header-Content-Length bytes of the body are not a JSON "
                                 "object") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BinaryRequestError('the JSON header must be an object with a list "inputs"')
    at = n
    for i, inp in enumerate(request["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise BinaryRequestError(f"inputs[{i}] must be an object with a string name")
        name, datatype = inp["name"][:64], inp.get("datatype")
        if datatype not in _FIXED and datatype != "BYTES":
            raise BinaryRequestError(f"input {name!r}: datatype must be an Open Inference Protocol type")
        params = inp.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BinaryRequestError(f"input {name!r}: parameters must be an object")
        size = (params or {}).get("binary_data_size")
        if size is None:
            if "data" not in inp:
                raise BinaryRequestError(f"input {name!r}: neither data nor parameters.binary_data_size")
            continue
        if "data" in inp:
            raise BinaryRequestError(f"input {name!r}: both data and parameters.binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BinaryRequestError(f"input {name!r}: parameters.binary_data_size must be a non-negative integer")
        if at + size > len(body):
            raise BinaryRequestError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
        count = _elements(name, inp.get("shape"), max_elements)
        inp["data"] = _decode(name, datatype, count, body[at:at + size])
        at += size
        params = {k: v for k, v in params.items() if k != "binary_data_size"}
        if params:
            inp["parameters"] = params
        else:
            inp.pop("parameters", None)
    if at != len(body):
        raise BinaryRequestError(f"{len(body) - at} bytes after the last binary input: the body does not match "
                                 "the inputs' binary_data_size")
    return request


def binary_body(request: dict[str, Any], binary: dict[str, tuple[str, list]]) -> tuple[bytes, int]:
    """(body, header length) of a binary-extension request, as tritonclient builds it: `binary` maps an input's
    name to (datatype, values) sent as raw bytes; None in a float input is sent as NaN. For clients and tests."""
    import json

    chunks = []
    inputs = []
    for inp in request["inputs"]:
        if inp["name"] not in binary:
            inputs.append(inp)
            continue
        datatype, values = binary[inp["name"]]
        if datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(b)) + b for b in (str(v).encode() for v in values))
        else:
            values = [math.nan if v is None else v for v in values]
            data = struct.pack(f"<{len(values)}{_FIXED[datatype]}", *values)
        chunks.append(data)
        inputs.append({k: v for k, v in inp.items() if k != "data"} | {
            "datatype": datatype, "parameters": {**inp.get("parameters", {}), "binary_data_size": len(data)}})
    header = json.dumps({**request, "inputs": inputs}).encode()
    return header + b"".join(chunks), len(header)
