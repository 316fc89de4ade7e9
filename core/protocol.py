"""Request bodies the server speaks, built one way for every client here (the deployment's smoke checks, the
replay tool, tests and benchmarks): KServe v1 and the Open Inference Protocol v2 in KServe's pandas codec (one
named tensor per feature column, numbers FP64, categories and text BYTES).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.names import OUTPUT_NAMES


def json_value(value: Any, numeric: bool) -> Any:
    """A feature value as JSON sends it: missing (None, NaN, pandas' NA/NaT) is null, numbers float, rest str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None
    return float(value) if numeric else str(value)


def v2_request(rows: Sequence[Mapping[str, Any]], numeric: Iterable[str], others: Iterable[str],
               request_id: str | None = None) -> dict[str, Any]:
    """A v2 body for `rows` (feature -> value): `numeric` columns as FP64, `others` (categories, text) as BYTES."""
    numeric, others = list(numeric), list(others)
    inputs = []
    for col in [*numeric, *others]:
        is_num = col in numeric
        tensor: dict[str, Any] = {"name": col, "shape": [len(rows)], "datatype": "FP64" if is_num else "BYTES",
                                  "data": [json_value(r.get(col), is_num) for r in rows]}
        if not is_num:
            tensor["parameters"] = {"content_type": "str"}
        inputs.append(tensor)
    body: dict[str, Any] = {"parameters": {"content_type": "pd"}, "inputs": inputs}
    if request_id is not None:
        body["id"] = request_id
    return body


def v1_request(rows: Sequence[Mapping[str, Any]], numeric: Iterable[str], others: Iterable[str]) -> dict[str, Any]:
    """A v1 body: {"instances": [{feature: value, ...}, ...]}."""
    numeric, others = list(numeric), list(others)
    return {"instances": [{c: json_value(r.get(c), c in numeric) for c in [*numeric, *others]} for r in rows]}


def v2_outputs(body: Any) -> dict[str, list]:
    """name -> data of a v2 answer's output tensors; a malformed answer is a ValueError saying what is missing."""
    outputs = body.get("outputs") if isinstance(body, dict) else None
    if not isinstance(outputs, list):
        raise ValueError(f"a v2 answer has an 'outputs' list; this one has keys {sorted(body) if isinstance(body, dict) else type(body).__name__}")
    found = {o["name"]: o.get("data") for o in outputs if isinstance(o, dict) and isinstance(o.get("name"), str)}
    missing = [n for n in OUTPUT_NAMES if n not in found]
    if missing:
        raise ValueError(f"the v2 answer lacks output tensor(s) {missing} (it has {sorted(found)})")
    return found
