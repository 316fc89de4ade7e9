"""The data stage: raw_dataset -> (blocking Great Expectations checks) -> validated_dataset -> training_splits."""


import json
from collections import Counter
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from assets import naming
from assets.checks.data_quality import DATA_CHECKS, CheckOutcome, Profile, label_series, validate_frame
from assets.features import clean_text
from assets.naming import LABEL, ROW_ID, SPLIT, asset_key
from assets.outcome_trust import flagged, outcome_key_bursts
from assets.profile import load_profile, write_profile
from assets.sources import parquet_safe, read_source
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import Log
from core.audit import AuditStore
from resources.storage import StorageResource, atomic_write_bytes, atomic_write_json, frame_hash, \
    frame_to_parquet_bytes


class DataValidationError(RuntimeError):
    """A snapshot broke a blocking expectation; the message lists every failure."""


# --- validation records ----------------------------------------------------------------------------------------
# A validation outcome is stored per raw content hash, so validated_dataset can refuse a snapshot whose
# checks failed even when someone materializes it without its checks.


def _validation_record_path(storage: StorageResource, spec: PipelineSpec, raw_hash: str):
    return storage.spec_dir(spec.name, "validation") / f"{raw_hash}.json"


def run_validation(storage: StorageResource, spec: PipelineSpec, raw: pd.DataFrame) -> list[CheckOutcome]:
    outcomes = validate_frame(raw, spec, load_profile(storage, spec))
    record = {
        "raw_hash": frame_hash(raw),
        "passed": all(o.passed for o in outcomes),
        "checks": {o.name: {"passed": o.passed, "failures": list(o.failures)} for o in outcomes},
    }
    atomic_write_json(_validation_record_path(storage, spec, record["raw_hash"]), record)
    return outcomes


# --- row-level cleaning ----------------------------------------------------------------------------------------


def clean_rows(raw: pd.DataFrame, spec: PipelineSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Typed, cleaned rows and the rows set aside, each with its reason."""
    cols = spec.columns
    df = raw[cols].copy()
    if spec.id_column:
        ids = raw[spec.id_column]
        row_id = ids.map(lambda v: None if pd.isna(v) else (str(int(v)) if isinstance(v, float) and v.is_integer()
                                                            else str(v)))
    else:
        row_id = pd.Series([str(i) for i in range(len(raw))], index=raw.index)
    df.insert(0, ROW_ID, row_id.astype(object))
    reasons = pd.Series([""] * len(df), index=df.index, dtype=object)

    def reject(mask: pd.Series, why: str) -> None:
        mask = mask.fillna(False).astype(bool) & (reasons == "")
        reasons[mask] = why

    reject(df[ROW_ID].isna(), f"id column '{spec.id_column}' is null")
    reject(df[ROW_ID].duplicated(keep="first"), f"id column '{spec.id_column}' repeats an earlier row's id")
    labels = label_series(df[spec.target.column], spec)
    reject(labels.isna(), f"target '{spec.target.column}' is null")

    for col in spec.features.numeric:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        reject(~np.isfinite(df[col]) & df[col].notna(), f"'{col}' is infinite")
    for col, rule in spec.validation.columns.items():
        if rule.min is not None or rule.max is not None:
            values = pd.to_numeric(df[col], errors="coerce")
            if rule.min is not None:
                reject(values < rule.min, f"'{col}' below declared min {rule.min}")
            if rule.max is not None:
                reject(values > rule.max, f"'{col}' above declared max {rule.max}")
        if rule.allowed is not None:
            allowed = {str(a) for a in rule.allowed} | {str(float(a)) for a in rule.allowed
                                                        if isinstance(a, int | float) and not isinstance(a, bool)}
            reject(df[col].notna() & ~df[col].map(str).isin(allowed), f"'{col}' outside declared allowed values")
    for col in spec.features.categorical:
        df[col] = df[col].map(lambda v: None if pd.isna(v) else (str(int(v)) if isinstance(v, float) and
                                                                 v.is_integer() else str(v))).astype(object)
    for col in spec.features.text:
        df[col] = df[col].map(clean_text).astype(object)
    if spec.time_column and spec.split.strategy == "time":
        reject(parse_time(df[spec.time_column]).isna(), f"time column '{spec.time_column}' is null or unparsable")

    df.insert(1, LABEL, labels.astype("float64"))
    keep = reasons == ""
    clean = df[keep].copy()
    clean[LABEL] = clean[LABEL].astype("int64")
    rejected = raw[~keep].copy()
    rejected.insert(0, "reason", reasons[~keep])
    return clean.reset_index(drop=True), parquet_safe(rejected.reset_index(drop=True))


def parse_time(values: pd.Series) -> pd.Series:
    """Numbers stay numbers; text such as 'Mar-2018' or '2018-03-01' becomes a timestamp."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    for fmt in ("%b-%Y", "%Y-%m-%d", "%Y-%m", "ISO8601"):
        parsed = pd.to_datetime(values, format=fmt, errors="coerce")
        if parsed.notna().sum() >= 0.9 * values.notna().sum():
            return parsed
    return pd.to_datetime(values, format="mixed", errors="coerce")


# --- splitting -------------------------------------------------------------------------------------------------


def assign_splits(df: pd.DataFrame, spec: PipelineSpec) -> pd.Series:
    """Deterministic split labels: stratified on the label for `random`, latest rows last for `time`."""
    s = spec.split
    n = len(df)
    out = pd.Series(["train"] * n, index=df.index, dtype=object)
    if s.strategy == "time":
        order = pd.DataFrame({"t": parse_time(df[spec.time_column]), "id": df[ROW_ID]}).sort_values(["t", "id"],
                                                                                                    kind="stable")
        n_test, n_val = round(n * s.test), round(n * s.validation)
        idx = order.index.to_numpy()
        out[idx[n - n_test:]] = "test"
        out[idx[n - n_test - n_val:n - n_test]] = "validation"
        return out
    rng = np.random.default_rng(s.seed)
    for label in (0, 1):
        # Sort by id first so the same rows get the same split whatever order the source returns them in.
        members = df.index[df[LABEL] == label]
        members = members[np.argsort(df.loc[members, ROW_ID].to_numpy().astype(str), kind="stable")]
        members = members[rng.permutation(len(members))]
        n_test, n_val = round(len(members) * s.test), round(len(members) * s.validation)
        out[members[:n_test]] = "test"
        out[members[n_test:n_test + n_val]] = "validation"
    return out


# --- the stage's work, as plain functions --------------------------------------------------------------------


def _preview(df: pd.DataFrame, rows: int = 5, cols: int = 12) -> str:
    return df.iloc[:rows, :cols].to_markdown(index=False)


def _schema(df: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=str(c), type=str(t)) for c, t in df.dtypes.items()])


DECISION_ID_PREFIX = "decision:"


def outcome_rows(spec: PipelineSpec, source: pd.DataFrame, store: AuditStore,
                 exclude_key_ids: tuple[str, ...] = ()) -> tuple[pd.DataFrame, int]:
    """Served decisions with an outcome label, as rows shaped like the source (labelled by their outcome).

    The label is the one `monitoring.outcome_rule` takes from the decision's outcome reports (core/audit/
    outcomes.py; `unanimous` by default: a disputed decision is left out), ignoring the reports of
    `exclude_key_ids`. Returns the rows and the last audit seq read. The id column (when the spec has one) is
    `decision:<id>`; the time column is the decision's time; columns the server never saw (for example a
    sensitive column that is not an input) are empty, and the data checks treat them as any other missing value.
    The inputs are decrypted by the store (its keys folder); without `audit-enc.key` this fails naming the file.
    """
    from core.audit.traffic import all_traffic, record_features

    labels = label_series(source[spec.target.column], spec)
    negative = source.loc[labels == 0, spec.target.column].mode()
    if negative.empty:
        raise DataValidationError(f"{spec.name}: the source has no negative row, so an outcome of 0 has no target "
                                  f"value to take ({spec.target.column!r})")
    positive, negative_value = spec.target.positive[0], negative.iloc[0]
    records = all_traffic(store, spec.name)
    after = records[-1].seq if records else 0
    outcomes = store.outcomes([r.decision_id for r in records], rule=spec.monitoring.outcome_rule,
                              exclude_key_ids=exclude_key_ids) if records else {}
    rows = []
    for r in records:
        if r.decision_id not in outcomes:
            continue
        row = record_features(r, spec.features.all)
        row[spec.target.column] = positive if outcomes[r.decision_id] == 1 else negative_value
        if spec.id_column:
            row[spec.id_column] = f"{DECISION_ID_PREFIX}{r.decision_id}"
        if spec.time_column:
            row[spec.time_column] = r.time
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[c for c in source.columns if c in spec.columns])
    return frame, after


def snapshot_source(loaded: LoadedSpec, log: Log, store: AuditStore | None = None,
                    exclude_key_ids: tuple[str, ...] = ()) -> dg.Output[pd.DataFrame]:
    """The source read once, Parquet-safe, with its content hash, schema and a preview; with
    `monitoring.learn_from_outcomes` (given the audit `store`), plus the served decisions whose outcome came back
    (labelled by the spec's outcome rule, the reports of `exclude_key_ids` left out)."""
    df, where = read_source(loaded)
    extra: dict[str, Any] = {}
    if store is not None:
        learned, seq = outcome_rows(loaded.spec, df, store, exclude_key_ids)
        if len(learned):
            df = pd.concat([df, learned.astype(object)], ignore_index=True)
        extra = {"rows_from_outcomes": len(learned), "outcomes_read_through_seq": seq,
                 "outcome_rule": loaded.spec.monitoring.outcome_rule,
                 "outcome_keys_excluded": dg.MetadataValue.json(list(exclude_key_ids))}
        if exclude_key_ids:
            log.warning(f"{loaded.name}: outcomes reported by {', '.join(exclude_key_ids)} are left out of the "
                        "snapshot: their reports contradict the model far beyond its measured error (inference_log)")
        log.info(f"{loaded.name}: {len(learned)} served decisions with outcomes join the snapshot")
    df = parquet_safe(df)
    digest = frame_hash(df)
    log.info(f"{loaded.name}: read {len(df)} rows x {df.shape[1]} columns from {where}")
    return dg.Output(df, data_version=dg.DataVersion(digest[:16]), metadata={
        "content_hash": digest, "source": where, "dagster/row_count": len(df),
        "dagster/column_schema": _schema(df), "columns": df.shape[1],
        "preview": dg.MetadataValue.md(_preview(df)), "spec_file": str(loaded.path), **extra,
    })


def check_results(storage: StorageResource, spec: PipelineSpec, raw: pd.DataFrame, log: Log
                  ) -> list[dg.AssetCheckResult]:
    """One blocking check result per family of the generated Great Expectations suite."""
    results = []
    for outcome in run_validation(storage, spec, raw):
        if not outcome.passed:
            log.error(f"{spec.name}/{outcome.name}: {outcome.description}")
        results.append(dg.AssetCheckResult(
            asset_key=asset_key(spec.name, naming.RAW_DATASET), check_name=outcome.name, passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR, description=outcome.description[:2000],
            metadata={"expectations": outcome.evaluated, "failures": len(outcome.failures),
                      "details": dg.MetadataValue.md("\n".join(f"- {f}" for f in outcome.failures) or "none")},
        ))
    return results


def validate_snapshot(storage: StorageResource, spec: PipelineSpec, raw: pd.DataFrame, log: Log
                      ) -> dg.Output[pd.DataFrame]:
    """Typed, cleaned rows of a snapshot whose data checks passed; refuses one whose checks failed."""
    raw_hash = frame_hash(raw)
    record_path = _validation_record_path(storage, spec, raw_hash)
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None:
        log.info("no validation record for this snapshot; running the data checks now")
        run_validation(storage, spec, raw)
        record = json.loads(record_path.read_text())
    if not record["passed"]:
        broken = [f"{name}: {'; '.join(c['failures'])}" for name, c in record["checks"].items() if not c["passed"]]
        raise DataValidationError(
            f"{spec.name}: raw snapshot {raw_hash[:12]} failed its data checks, so the last good "
            f"validated_dataset stays in place. " + " | ".join(broken))
    clean, rejected = clean_rows(raw, spec)
    if len(clean) < spec.validation.min_rows:
        raise DataValidationError(
            f"{spec.name}: only {len(clean)} of {len(raw)} rows survive row-level rules (validation.min_rows "
            f"is {spec.validation.min_rows}); reasons: {dict(Counter(rejected['reason']).most_common(5))}")
    rejected_path = storage.spec_dir(spec.name, "validation") / "rejected_rows.parquet"
    atomic_write_bytes(rejected_path, frame_to_parquet_bytes(rejected))
    write_profile(storage, spec, Profile.of(clean, spec, raw))
    digest = frame_hash(clean)
    reasons = Counter(rejected["reason"])
    return dg.Output(clean, data_version=dg.DataVersion(digest[:16]), metadata={
        "content_hash": digest, "raw_hash": raw_hash, "dagster/row_count": len(clean),
        "rows_set_aside": len(rejected), "rejected_rows_path": dg.MetadataValue.path(str(rejected_path)),
        "set_aside_reasons": dg.MetadataValue.md(
            "\n".join(f"- {r}: {n}" for r, n in reasons.most_common(20)) or "none"),
        "positive_rate": round(float(clean[LABEL].mean()), 4),
        "dagster/column_schema": _schema(clean), "preview": dg.MetadataValue.md(_preview(clean)),
    })


def split_rows(spec: PipelineSpec, validated: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Every validated row's split, with each split's size, positive rate, hash and first ids."""
    labels = assign_splits(validated, spec)
    splits = pd.DataFrame({ROW_ID: validated[ROW_ID].to_numpy(), SPLIT: labels.to_numpy()})
    meta: dict[str, Any] = {"strategy": spec.split.strategy, "seed": spec.split.seed,
                            "validated_hash": frame_hash(validated)}
    for name in ("train", "validation", "test"):
        part = validated[labels == name]
        if name != "validation" or spec.split.validation > 0:
            if part[LABEL].nunique() < 2:
                raise DataValidationError(
                    f"{spec.name}: the {name} split has {len(part)} rows but only one target class; "
                    f"more rows or a different split are needed")
        meta[f"{name}_rows"] = len(part)
        meta[f"{name}_positive_rate"] = round(float(part[LABEL].mean()), 4) if len(part) else 0.0
        meta[f"{name}_hash"] = frame_hash(part.reset_index(drop=True))
        meta[f"{name}_first_ids"] = ", ".join(part[ROW_ID].astype(str).head(5))
    digest = frame_hash(splits)
    meta["splits_hash"] = digest
    meta["dagster/row_count"] = len(splits)
    return dg.Output(splits, data_version=dg.DataVersion(digest[:16]), metadata=meta)


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    """raw_dataset, its blocking checks, validated_dataset and training_splits for one spec."""
    spec = loaded.spec
    raw_key, validated_key, splits_key = (asset_key(spec.name, n) for n in
                                          (naming.RAW_DATASET, naming.VALIDATED_DATASET, naming.TRAINING_SPLITS))

    learns = spec.monitoring.learn_from_outcomes

    @dg.asset(key=raw_key, group_name=naming.DATA, required_resource_keys={"audit"} if learns else set())
    def raw_dataset(context: dg.AssetExecutionContext) -> dg.Output[pd.DataFrame]:
        """Snapshot of the spec's source as Parquet: content hash, schema, row count and a preview (and, when
        the spec learns from outcomes, the served decisions whose outcome came back, counted in metadata)."""
        if not learns:
            return snapshot_source(loaded, context.log)
        store = context.resources.audit.store()
        excluded = tuple(flagged(outcome_key_bursts(context.instance, store, spec.name))
                         if spec.monitoring.exclude_flagged_outcome_keys else ())
        return snapshot_source(loaded, context.log, store, excluded)

    @dg.multi_asset_check(specs=[dg.AssetCheckSpec(name=name, asset=raw_key, blocking=True, description=doc)
                                 for name, doc in DATA_CHECKS.items()],
                          name=f"{spec.name}__data_expectations", ins={"raw": dg.AssetIn(key=raw_key)})
    def data_expectations(context: dg.AssetCheckExecutionContext, storage: StorageResource, raw: pd.DataFrame):
        """The Great Expectations suite generated from the spec, one blocking check per family."""
        yield from check_results(storage, spec, raw, context.log)

    @dg.asset(key=validated_key, group_name=naming.DATA, ins={"raw": dg.AssetIn(key=raw_key)})
    def validated_dataset(context: dg.AssetExecutionContext, storage: StorageResource,
                          raw: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Typed, cleaned rows of a snapshot that passed every data check; rows that break row-level rules
        (null target, repeated id, values outside declared rules) are set aside with their reason."""
        return validate_snapshot(storage, spec, raw, context.log)

    @dg.asset(key=splits_key, group_name=naming.DATA, ins={"validated": dg.AssetIn(key=validated_key)})
    def training_splits(validated: pd.DataFrame) -> dg.Output[pd.DataFrame]:
        """Deterministic train / validation / test assignment of every validated row, with a hash per split."""
        return split_rows(spec, validated)

    return dg.Definitions(assets=[raw_dataset, validated_dataset, training_splits], asset_checks=[data_expectations])
