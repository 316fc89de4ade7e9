"""Decoding and validation: a KServe v1 or Open Inference Protocol v2 request becomes checked feature rows.

`columns_from_v1` and `columns_from_v2` turn a request body into columns (feature -> values, one per row);
`validate_columns` checks every value against the config (types, the accepted ranges and categories learned from
the training data, the spec's allowed numeric values, text length, rows per request; null only where the column
may be missing, and enough known features per row) and returns the rows. Every problem is an `InvalidRequest`
whose message names the field and the row; the model answers it with a 4xx (workloads/serving/model.py).
"""

from __future__ import annotations

import math
from typing import Any

from core.server_config import ServerConfig


class InvalidRequest(ValueError):
    """Bad input: answered with a 4xx whose message names the field."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v: Any) -> str:
    """A value as an error message shows it: never more than a few dozen characters of what was sent."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _missing(col: str, i: int, cfg: ServerConfig) -> None:
    """A null (or a NaN in a binary tensor) is "missing": accepted only where the column may be missing."""
    if not cfg.may_be_missing(col):
        raise InvalidRequest(f"field {col!r} row {i}: missing (null), but {col!r} was never missing in the training "
                             "data, so the model has not learned what a missing value means; send a value")


def _check_known(rows: list[dict[str, Any]], cfg: ServerConfig) -> None:
    """Refuse a row with too few known features (deployment.min_known_fraction): scoring it would be a guess."""
    need = math.ceil(cfg.min_known_fraction * len(cfg.features))
    for i, row in enumerate(rows):
        unknown = [c for c in cfg.features if row[c] is None or (c in cfg.text and not str(row[c]).strip())]
        if len(cfg.features) - len(unknown) < need:
            raise InvalidRequest(f"row {i}: only {len(cfg.features) - len(unknown)} of {len(cfg.features)} features "
                                 f"are known (missing: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}); at least "
                                 f"{need} must be (deployment.min_known_fraction {cfg.min_known_fraction:g})")


def _check_numeric(col: str, values: list, bounds: tuple[float, float] | None, cfg: ServerConfig) -> None:
    allowed = cfg.numeric_allowed.get(col)
    for i, v in enumerate(values):
        if v is None:
            _missing(col, i, cfg)
            continue
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise InvalidRequest(f"field {col!r} row {i}: {_shown(v)} is not a number") from None
            values[i] = v
        if not _is_number(v):
            raise InvalidRequest(f"field {col!r} row {i}: expected a number or null, got {type(v).__name__}")
        if not math.isfinite(v):
            raise InvalidRequest(f"field {col!r} row {i}: {v} is not a finite number")
        if allowed is not None and float(v) not in allowed:
            raise InvalidRequest(f"field {col!r} row {i}: {v:g} is not one of the values the spec allows "
                                 f"({', '.join(f'{a:g}' for a in allowed)})")
        if bounds is not None and not bounds[0] <= v <= bounds[1]:
            raise InvalidRequest(f"field {col!r} row {i}: {v:g} is outside the accepted range "
                                 f"[{bounds[0]:g}, {bounds[1]:g}] learned from the training data")
        values[i] = float(v)


def validate_columns(columns: dict[str, list], cfg: ServerConfig) -> list[dict[str, Any]]:
    """Rows of typed, checked feature values; the first problem found is raised naming the field and row."""
    missing = [c for c in cfg.features if c not in columns]
    if missing:
        raise InvalidRequest(f"missing feature field(s) {missing}; every request row needs {cfg.features}")
    unknown = sorted(set(columns) - set(cfg.features))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {[str(u)[:40] for u in unknown[:10]]}; the features of {cfg.spec} are "
                             f"{cfg.features}")
    lengths = {c: len(columns[c]) for c in cfg.features}
    n = next(iter(lengths.values()), 0)
    if any(v != n for v in lengths.values()):
        raise InvalidRequest(f"feature fields have different numbers of rows: {lengths}")
    if n == 0:
        raise InvalidRequest("the request has no rows")
    if n > cfg.max_batch_rows:
        raise InvalidRequest(f"{n} rows in one request; at most {cfg.max_batch_rows} (deployment.max_batch_rows)")
    for col, bounds in cfg.numeric.items():
        _check_numeric(col, columns[col], bounds, cfg)
    for col, allowed in cfg.categorical.items():
        allowed_set = set(allowed) if allowed is not None else None
        values = columns[col]
        for i, v in enumerate(values):
            if v is None:
                _missing(col, i, cfg)
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise InvalidRequest(f"field {col!r} row {i}: expected a category (string) or null, "
                                     f"got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidRequest(f"field {col!r} row {i}: {v} is not a category")
            # A category learned from a numeric column may be spelled "36" or "36.0"; use the learned spelling.
            spellings = [str(v)]
            if isinstance(v, float) and v.is_integer():
                spellings.append(str(int(v)))
            elif isinstance(v, int):
                spellings.append(str(float(v)))
            if allowed_set is None:
                values[i] = spellings[0]
                continue
            known = next((s for s in spellings if s in allowed_set), None)
            if known is None:
                shown = sorted(allowed_set)[:20]
                raise InvalidRequest(f"field {col!r} row {i}: {_shown(spellings[0])} is not a known category; "
                                     f"expected one of {shown}{' ...' if len(allowed_set) > 20 else ''}")
            values[i] = known
    for col in cfg.text:
        values = columns[col]
        for i, v in enumerate(values):
            if v is None:
                _missing(col, i, cfg)
                continue
            if not isinstance(v, str):
                raise InvalidRequest(f"field {col!r} row {i}: expected text (string) or null, got {type(v).__name__}")
            if len(v) > cfg.max_text_chars:
                raise InvalidRequest(f"field {col!r} row {i}: {len(v)} characters; at most {cfg.max_text_chars}")
    rows = [{c: columns[c][i] for c in cfg.features} for i in range(n)]
    _check_known(rows, cfg)
    return rows


def columns_from_v1(body: Any, cfg: ServerConfig) -> dict[str, list]:
    """KServe v1: {"instances": [{feature: value, ...}, ...]} (or "inputs" with the same rows)."""
    if not isinstance(body, dict):
        raise InvalidRequest('a v1 body is a JSON object {"instances": [{"<feature>": <value>, ...}, ...]}')
    rows = body.get("instances", body.get("inputs"))
    if not isinstance(rows, list):
        raise InvalidRequest('field "instances": expected a list of objects, one per applicant')
    if len(rows) > cfg.max_batch_rows:
        raise InvalidRequest(f"{len(rows)} rows in one request; at most {cfg.max_batch_rows} "
                             "(deployment.max_batch_rows)")
    columns: dict[str, list] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidRequest(f"instances[{i}]: expected an object of feature values, got {type(row).__name__}")
        for k in row:
            if k not in columns:
                if i:
                    raise InvalidRequest(f"instances[{i}]: field {_shown(k)} is not in the earlier rows")
                columns[k] = []
        for k in columns:
            if k not in row:
                raise InvalidRequest(f"instances[{i}]: missing field {_shown(k)}")
            columns[k].append(row[k])
    return columns


_V2_TYPES = {"FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8",
             "BOOL", "BYTES"}


def columns_from_v2(request: Any, cfg: ServerConfig) -> dict[str, list]:
    """Open Inference Protocol v2, pandas codec: one named tensor per feature column, one element per row."""
    columns: dict[str, list] = {}
    for inp in request.inputs:
        name, datatype, shape = inp.name, inp.datatype, list(inp.shape or [])
        if name in columns:
            raise InvalidRequest(f"input {_shown(name)} appears twice")
        if datatype not in _V2_TYPES:
            raise InvalidRequest(f"input {_shown(name)}: datatype {_shown(datatype)} is not an Open Inference Protocol type")
        data = inp.data
        if hasattr(data, "tolist"):
            data = data.tolist()
        if not isinstance(data, list):
            raise InvalidRequest(f"input {_shown(name)}: data must be a list")
        flat: list = []
        stack = [data]
        while stack:  # a [n, 1] tensor may arrive nested
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
            raise InvalidRequest(f"input {_shown(name)}: shape {shape} must be non-negative integers")
        if math.prod(shape) != len(flat) or (len(shape) > 1 and math.prod(shape[1:]) != 1):
            raise InvalidRequest(f"input {_shown(name)}: shape {shape} does not match {len(flat)} values; a feature "
                                 "column is [rows] or [rows, 1]")
        if len(flat) > cfg.max_batch_rows:
            raise InvalidRequest(f"input {_shown(name)}: {len(flat)} rows in one request; at most {cfg.max_batch_rows}")
        if datatype == "BYTES":
            out = []
            for v in flat:
                if isinstance(v, bytes):
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise InvalidRequest(f"input {_shown(name)}: bytes that are not UTF-8") from None
                out.append(v)
            flat = out
        if name in cfg.numeric and datatype == "BOOL":
            raise InvalidRequest(f"input {_shown(name)}: datatype BOOL for a numeric feature; use FP64 or INT64")
        if name in cfg.numeric and datatype == "BYTES":
            raise InvalidRequest(f"input {_shown(name)}: datatype BYTES for a numeric feature; use FP64 or INT64")
        if name in cfg.text and datatype != "BYTES":
            raise InvalidRequest(f"input {_shown(name)}: text goes as datatype BYTES, not {datatype}")
        columns[name] = flat
    return columns
