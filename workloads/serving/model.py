"""The spec's model behind KServe's v1 and v2 protocols: one `kserve.Model` whose stages do one thing each.

KServe calls `preprocess` -> `predict` (or `explain`) -> `postprocess` for every request and times each stage
on /metrics (`request_preprocess_seconds`, `request_predict_seconds`, ...), so the stages split the work:

- `preprocess` decodes the v1 body or the v2 `InferRequest` into checked feature rows (workloads/serving/
  decoding.py); bad input is a 400 naming the field.
- `predict` scores the rows: they join the batching engine's queue and come back as decision records that are
  already committed to the audit log. `explain` does the same with the top factors always filled in.
- `postprocess` shapes the answer: `{"predictions": [...]}` (or `"explanations"`) for v1, an `InferResponse`
  with one output tensor per field of core.names.OUTPUTS for v2.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput

from core.names import KEY_ID_HEADER, OUTPUT_NAMES, OUTPUTS
from core.server_config import AnswerView, ServerConfig
from workloads.serving.batching import BatchingEngine
from workloads.serving.decoding import (InvalidRequest, audit_columns, columns_from_v1, columns_from_v2,
                                       validate_columns)
from workloads.serving.gateway import CLIENT_HEADER, SIMILAR_HEADER
from workloads.serving.versions import ServedVersions

EXPLAIN_AT_LEAST = 3  # an explanation always carries at least this many top factors


@dataclass(frozen=True)
class Decoded:
    """What `preprocess` hands on: checked rows, the v2 request they came in (None for v1) and the caller's key id."""

    rows: list[dict[str, Any]]
    request: InferRequest | None
    key_id: str | None
    caller: str | None = None  # who the request counts against for fair scheduling (the gateway's CLIENT_HEADER)
    audit: list[dict[str, Any]] | None = None  # per row: audit-only fields, kept on the record, never scored
    similar: bool = False  # the key has the similar_cases scope (the gateway's SIMILAR_HEADER)


@dataclass(frozen=True)
class Decided:
    """What `predict` and `explain` hand on: the committed decision records, and how they were asked for."""

    records: list[dict[str, Any]]
    request: InferRequest | None
    field: str  # the v1 answer's list: predictions | explanations


FULL = AnswerView()
SCOPE_OF_FIELD = {"predictions": "predict", "explanations": "explain"}


def shown(record: dict[str, Any], view: AnswerView) -> dict[str, Any]:
    """The record's output fields as `view` lets them be seen (the record itself is kept whole on the log)."""
    out = {name: record.get(name) for name in OUTPUT_NAMES}
    if view.probability_decimals is not None:
        out["probability"] = round(float(out["probability"]), view.probability_decimals)
    if not view.top_factors:
        out["top_factors"] = []
    return out


def v1_answer(record: dict[str, Any], view: AnswerView = FULL) -> dict[str, Any]:
    """One decision as v1 answers it: the output fields (`notice` null when the decision has none) and, unless the
    view hides it, the threshold it was decided at."""
    out = shown(record, view)
    return {**out, "threshold": record["threshold"]} if view.threshold else out


def _tensor_value(value: Any, datatype: str) -> Any:
    if value is None and datatype == "BYTES":
        return ""  # a decision without a notice
    if value is None and datatype in ("FP64", "INT64"):
        return -1  # not scored (a version without an out-of-distribution detector)
    return json.dumps(value) if datatype == "BYTES" and not isinstance(value, str) else value


def v2_answer(request: InferRequest, records: list[dict[str, Any]], model_name: str,
              view: AnswerView = FULL) -> InferResponse:
    """The decisions as v2 output tensors, one per field of core.names.OUTPUTS (lists travel as JSON text)."""
    records = [shown(r, view) for r in records]
    outputs = [InferOutput(name=name, shape=[len(records)], datatype=datatype,
                           data=[_tensor_value(r.get(name), datatype) for r in records]) for name, datatype in OUTPUTS]
    return InferResponse(response_id=request.id or uuid.uuid4().hex, model_name=model_name,
                         model_version=records[0]["model_version"] if records else None, infer_outputs=outputs)


class DecisionModel(kserve.Model):
    """The spec's champion (and challenger) behind KServe's v1 and v2 protocols."""

    def __init__(self, cfg: ServerConfig, versions: ServedVersions, engine: BatchingEngine):
        super().__init__(cfg.spec)
        self.cfg, self.versions, self.engine = cfg, versions, engine

    def load(self) -> bool:
        self.versions.refresh()
        self.ready = True
        return True

    def get_input_types(self) -> list[dict]:
        types = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in self.cfg.numeric]
        return types + [{"name": c, "datatype": "BYTES", "shape": [-1]}
                        for c in [*self.cfg.categorical, *self.cfg.text]]

    def get_output_types(self) -> list[dict]:
        return [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS]

    def validate(self, payload: Any) -> Any:
        """`preprocess` has validated everything already (KServe's own check looks only at v1/v2 dict shapes)."""
        return payload

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> Decoded:
        v2 = isinstance(payload, InferRequest)
        try:
            columns = columns_from_v2(payload, self.cfg) if v2 else columns_from_v1(payload, self.cfg)
            audit = audit_columns(columns, self.cfg)
            rows = validate_columns(columns, self.cfg)
            if audit is not None and len(audit) != len(rows):
                raise InvalidRequest(f"audit-only fields have {len(audit)} rows, the features {len(rows)}")
        except InvalidRequest as exc:
            raise InvalidInput(str(exc)) from None
        headers = headers or {}
        return Decoded(rows=rows, request=payload if v2 else None, key_id=headers.get(KEY_ID_HEADER),
                       caller=headers.get(CLIENT_HEADER), audit=audit,
                       similar=headers.get(SIMILAR_HEADER) == "1")

    async def _decide(self, decoded: Decoded, explain: int, field: str) -> Decided:
        try:
            records = await self.engine.submit(decoded.rows, explain, decoded.key_id, decoded.caller, decoded.audit,
                                               decoded.similar)
        except InvalidRequest as exc:  # rows whose values give no finite score
            raise InvalidInput(str(exc)) from None
        return Decided(records=records, request=decoded.request, field=field)

    def _explain_at_least(self, top: int) -> int:
        """A notice is written from the decision's top factors: with notices on, at least as many as it reads."""
        notices = self.engine.notices
        return max(top, notices.top_factors) if notices is not None else top

    async def predict(self, payload: Decoded, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Decided:
        return await self._decide(payload, self._explain_at_least(self.cfg.explain_top), "predictions")

    async def explain(self, payload: Decoded, headers: dict[str, str] | None = None) -> Decided:
        return await self._decide(payload, self._explain_at_least(max(self.cfg.explain_top, EXPLAIN_AT_LEAST)),
                                  "explanations")

    async def postprocess(self, result: Decided, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        view = self.cfg.answers.get(SCOPE_OF_FIELD[result.field], FULL)
        if result.request is not None:
            return v2_answer(result.request, result.records, self.cfg.spec, view)
        return {result.field: [v1_answer(r, view) for r in result.records]}
