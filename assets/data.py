"""The data stage: raw_dataset -> (blocking Great Expectations checks) -> validated_dataset -> training_splits.

A spec with `partitions` snapshots, checks and validates a month at a time (assets/partitions.py): each month against
the profile of the months before it, so a corrupted month fails its own checks and the others stay as they were.
training_splits then reads the training window (the IO manager's unpartitioned view) and refuses a window with a
month missing, or one whose newest snapshot failed its checks.
"""


import hashlib
import json
from collections import Counter
from typing import Any

import dagster as dg

from assets import naming
from assets.checks.data_quality import DATA_CHECKS, CheckOutcome, Profile, label_series, validate_frame
from assets.features import clean_text
from assets.naming import LABEL, ROW_ID, SPLIT, asset_key
from assets.outcome_trust import flagged, outcome_key_bursts
from assets.partitions import (WINDOW_HASH, WINDOW_KEY, WINDOW_PARTITIONS, month_keys, parse_time,
                               partition_output, partitioned_asset_kwargs, partitions_def, quiet_preview, run_keys,
                               split_by_partition, window_bounds, window_label, with_note, Frames)
from assets.profile import load_profile, month_profiles, reference_before, write_profile
from assets.sources import SourceError, parquet_safe, read_source
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import DataFrameType, Log
from core.audit import AuditStore
from core.lazy import np, pd
from resources.storage import StorageResource, atomic_write_bytes, atomic_write_json, frame_hash, \
    frame_to_parquet_bytes, window_keys


class DataValidationError(RuntimeError):
    """A snapshot broke a blocking expectation; the message lists every failure."""


# --- validation records ----------------------------------------------------------------------------------------
# A validation outcome is stored per raw content hash, so validated_dataset can refuse a snapshot whose
# checks failed even when someone materializes it without its checks.


def _validation_record_path(storage: StorageResource, spec: PipelineSpec, raw_hash: str):
    return storage.spec_dir(spec.name, "validation") / f"{raw_hash}.json"


def run_validation(storage: StorageResource, spec: PipelineSpec, raw: "pd.DataFrame",
                   profile: Profile | None) -> list[CheckOutcome]:
    """The generated suite on `raw` (a snapshot, or one month of a partitioned spec) against the learned `profile`,
    its outcome stored by the snapshot's hash."""
    outcomes = validate_frame(raw, spec, profile, month=spec.partitioned)
    record = {
        "raw_hash": frame_hash(raw),
        "passed": all(o.passed for o in outcomes),
        "checks": {o.name: {"passed": o.passed, "failures": list(o.failures)} for o in outcomes},
    }
    atomic_write_json(_validation_record_path(storage, spec, record["raw_hash"]), record)
    return outcomes


# --- row-level cleaning ----------------------------------------------------------------------------------------


def clean_rows(raw: "pd.DataFrame", spec: PipelineSpec) -> "tuple[pd.DataFrame, pd.DataFrame]":
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

    def reject(mask: "pd.Series", why: str) -> None:
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


# --- splitting -------------------------------------------------------------------------------------------------


def assign_splits(df: "pd.DataFrame", spec: PipelineSpec) -> "pd.Series":
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


def _preview(df: "pd.DataFrame", rows: int = 5, cols: int = 12) -> str:
    return df.iloc[:rows, :cols].to_markdown(index=False)


def _schema(df: "pd.DataFrame") -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=str(c), type=str(t)) for c, t in df.dtypes.items()])


DECISION_ID_PREFIX = "decision:"


def outcome_rows(spec: PipelineSpec, source: "pd.DataFrame", store: AuditStore,
                 exclude_key_ids: tuple[str, ...] = ()) -> "tuple[pd.DataFrame, int]":
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


def _read(loaded: LoadedSpec, log: Log, store: AuditStore | None, keys: list[str],
          exclude_key_ids: tuple[str, ...] = ()) -> "tuple[pd.DataFrame, str, dict[str, Any]]":
    """The source (a SQL source bound to the run's months), plus outcome rows when the spec learns from them
    (labelled by the spec's outcome rule, the reports of `exclude_key_ids` left out)."""
    df, where = read_source(loaded, window_bounds(keys) if keys else None)
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
    return parquet_safe(df), where, extra


def _snapshot_metadata(loaded: LoadedSpec, df: "pd.DataFrame", where: str) -> dict[str, Any]:
    return {"content_hash": frame_hash(df), "source": where, "dagster/row_count": len(df),
            "dagster/column_schema": _schema(df), "columns": df.shape[1],
            "preview": dg.MetadataValue.md(_preview(df)), "spec_file": str(loaded.path)}


def snapshot_source(loaded: LoadedSpec, log: Log, store: AuditStore | None = None,
                    exclude_key_ids: tuple[str, ...] = ()) -> "dg.Output[pd.DataFrame]":
    """The source read once, Parquet-safe, with its content hash, schema and a preview; with
    `monitoring.learn_from_outcomes` (given the audit `store`), plus the served decisions whose outcome came back
    (labelled by the spec's outcome rule, the reports of `exclude_key_ids` left out)."""
    df, where, extra = _read(loaded, log, store, [], exclude_key_ids)
    meta = {**_snapshot_metadata(loaded, df, where), **extra}
    log.info(f"{loaded.name}: read {len(df)} rows x {df.shape[1]} columns from {where}")
    return dg.Output(df, data_version=dg.DataVersion(meta["content_hash"][:16]), metadata=meta)


def snapshot_months(loaded: LoadedSpec, keys: list[str], log: Log, store: AuditStore | None = None,
                    exclude_key_ids: tuple[str, ...] = ()
                    ) -> "tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]], dict[str, Any]]":
    """The source read once for a run's months and cut into them by the time column: each month's rows, each
    month's metadata (its own content hash), and what the run read (rows outside its months, without a time)."""
    spec = loaded.spec
    df, where, extra = _read(loaded, log, store, keys, exclude_key_ids)
    months = month_keys(spec, df[spec.time_column])
    parts = split_by_partition(df, spec, keys, months)
    empty = [k for k, part in parts.items() if part.empty]
    if empty:
        raise SourceError(f"{loaded.path}: source {where} has no row in month(s) {', '.join(empty)} of time column "
                          f"{spec.time_column!r}; the last good snapshot of each stays in place (materialize only "
                          "months that have data)")
    common = {"source": where, "rows_read": len(df), "rows_in_other_months": int(months.notna().sum() -
                                                                                 sum(len(p) for p in parts.values())),
              "rows_without_time": int(months.isna().sum()), **extra}
    metas = {k: {**_snapshot_metadata(loaded, part, where), "partition": k} for k, part in parts.items()}
    log.info(f"{loaded.name}: read {len(df)} rows from {where}; " +
             ", ".join(f"{k}: {len(parts[k])}" for k in keys))
    return parts, metas, common


def _check_result(spec: PipelineSpec, name: str, outcome: CheckOutcome, log: Log) -> dg.AssetCheckResult:
    if not outcome.passed:
        log.error(f"{spec.name}/{outcome.name}: {outcome.description}")
    return dg.AssetCheckResult(
        asset_key=asset_key(spec.name, naming.RAW_DATASET), check_name=name, passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR, description=outcome.description[:2000],
        metadata={"expectations": outcome.evaluated, "failures": len(outcome.failures),
                  "details": dg.MetadataValue.md("\n".join(f"- {f}" for f in outcome.failures) or "none")})


def check_results(storage: StorageResource, spec: PipelineSpec, raw: "pd.DataFrame", log: Log
                  ) -> list[dg.AssetCheckResult]:
    """One blocking check result per family of the generated Great Expectations suite."""
    outcomes = run_validation(storage, spec, raw, load_profile(storage, spec))
    return [_check_result(spec, o.name, o, log) for o in outcomes]


def check_months(storage: StorageResource, spec: PipelineSpec, raw: "pd.DataFrame", keys: list[str], log: Log
                 ) -> list[dg.AssetCheckResult]:
    """Each month of a run checked on its own, in time order, against the profile of the validated months before
    it (a month earlier in the same run counts once it passed; assets/profile.py, reference_before); one result per
    check family, failures prefixed with their month."""
    parts = split_by_partition(raw, spec, keys)
    profiles = month_profiles(storage, spec)
    per_month: dict[str, list[CheckOutcome]] = {}
    for k in sorted(keys):
        per_month[k] = run_validation(storage, spec, parts[k], reference_before(profiles, k))
        if all(o.passed for o in per_month[k]) and k != max(keys):
            clean, _ = clean_rows(parts[k], spec)
            profiles[k] = Profile.of(clean, spec, parts[k])
    results = []
    for name in DATA_CHECKS:
        outcomes = [(k, next(o for o in per_month[k] if o.name == name)) for k in sorted(keys)]
        failures = tuple(f"{k}: {f}" for k, o in outcomes for f in o.failures)
        evaluated = sum(o.evaluated for _, o in outcomes)
        notes = tuple(dict.fromkeys(n for _, o in outcomes for n in o.notes))
        where = f"month {keys[0]}" if len(keys) == 1 else f"{len(keys)} months ({keys[0]}...{keys[-1]})"
        merged = CheckOutcome(name=name, passed=not failures, failures=failures, evaluated=evaluated,
                              notes=(where, *notes))
        results.append(_check_result(spec, name, merged, log))
    return results


def validated_rows(storage: StorageResource, spec: PipelineSpec, raw: "pd.DataFrame", log: Log,
                   partition: str | None = None) -> "tuple[pd.DataFrame, dict[str, Any]]":
    """Typed, cleaned rows of a snapshot (or of one month) whose data checks passed, and their metadata; refuses
    one whose checks failed."""
    raw_hash = frame_hash(raw)
    where = f" month {partition}" if partition else ""
    record_path = _validation_record_path(storage, spec, raw_hash)
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None:
        log.info(f"no validation record for this snapshot{where}; running the data checks now")
        run_validation(storage, spec, raw, load_profile(storage, spec, before=partition))
        record = json.loads(record_path.read_text())
    if not record["passed"]:
        broken = [f"{name}: {'; '.join(c['failures'])}" for name, c in record["checks"].items() if not c["passed"]]
        raise DataValidationError(
            f"{spec.name}: raw snapshot{where} {raw_hash[:12]} failed its data checks, so the last good "
            f"validated_dataset{where} stays in place. " + " | ".join(broken))
    clean, rejected = clean_rows(raw, spec)
    if len(clean) < spec.validation.min_rows:
        raise DataValidationError(
            f"{spec.name}:{where} only {len(clean)} of {len(raw)} rows survive row-level rules (validation.min_rows "
            f"is {spec.validation.min_rows}); reasons: {dict(Counter(rejected['reason']).most_common(5))}")
    folder = storage.spec_dir(spec.name, "validation")
    rejected_path = folder / "rejected_rows.parquet" if partition is None else \
        folder / "rejected_rows" / f"{partition}.parquet"
    atomic_write_bytes(rejected_path, frame_to_parquet_bytes(rejected))
    write_profile(storage, spec, Profile.of(clean, spec, raw), partition)
    reasons = Counter(rejected["reason"])
    meta = {
        "content_hash": frame_hash(clean), "raw_hash": raw_hash, "dagster/row_count": len(clean),
        "rows_set_aside": len(rejected), "rejected_rows_path": dg.MetadataValue.path(str(rejected_path)),
        "set_aside_reasons": dg.MetadataValue.md(
            "\n".join(f"- {r}: {n}" for r, n in reasons.most_common(20)) or "none"),
        "positive_rate": round(float(clean[LABEL].mean()), 4),
        "dagster/column_schema": _schema(clean), "preview": dg.MetadataValue.md(_preview(clean)),
    }
    return clean, meta if partition is None else {**meta, "partition": partition}


def validate_snapshot(storage: StorageResource, spec: PipelineSpec, raw: "pd.DataFrame", log: Log
                      ) -> "dg.Output[pd.DataFrame]":
    """Typed, cleaned rows of a snapshot whose data checks passed; refuses one whose checks failed."""
    clean, meta = validated_rows(storage, spec, raw, log)
    return dg.Output(clean, data_version=dg.DataVersion(meta["content_hash"][:16]), metadata=meta)


# --- the training window of a partitioned spec -------------------------------------------------------------------


def _latest(instance: dg.DagsterInstance, key: dg.AssetKey, month: str) -> dict[str, Any]:
    found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[month]), limit=1)
    if not found.records:
        return {}
    return {k: getattr(v, "value", v) for k, v in found.records[0].asset_materialization.metadata.items()}


def training_window(instance: dg.DagsterInstance, spec: PipelineSpec, validated: "pd.DataFrame"
                    ) -> dict[str, Any]:
    """The months the unpartitioned readers see (resources/storage.py: the latest `training.window.months` validated
    months), checked: none missing inside it, none whose newest raw snapshot failed its checks or was never
    validated, and together exactly the rows loaded. Returns training_splits' metadata naming them and their hashes.
    """
    pdef = partitions_def(spec)
    raw_key, validated_key = asset_key(spec.name, naming.RAW_DATASET), asset_key(spec.name, naming.VALIDATED_DATASET)
    ordered = list(pdef.get_partition_keys(dynamic_partitions_store=instance))
    validated_months = set(instance.get_materialized_partitions(validated_key))
    raw_months = set(instance.get_materialized_partitions(raw_key))
    months = spec.training.window.months if spec.training.window else None
    window = window_keys(ordered, validated_months, months)
    how = f"dagster asset materialize -m orchestration.definitions --select 'key:\"{spec.name}/*\" and group:data'"
    problems = []
    newer = sorted(m for m in raw_months - validated_months if window and m > window[-1])
    if newer:
        problems.append(f"raw_dataset month(s) {', '.join(newer)} are newer than the newest validated month "
                        f"{window[-1]}: their checks failed or they were never validated")
    if window:
        first = ordered.index(window[0])
        span = ordered[first:ordered.index(window[-1]) + 1]
        missing = [m for m in span if m not in validated_months]
        if missing:
            problems.append(f"month(s) {', '.join(missing)} inside the window have no validated_dataset "
                            f"(materialize them: {how} --partition-range {missing[0]}...{missing[-1]})")
    hashes: dict[str, str] = {}
    rows = 0
    for m in window:
        v, r = _latest(instance, validated_key, m), _latest(instance, raw_key, m)
        if r.get("content_hash") and v.get("raw_hash") and r["content_hash"] != v["raw_hash"]:
            problems.append(f"month {m}: its newest raw snapshot {str(r['content_hash'])[:12]} was not validated "
                            f"(its checks failed, or validated_dataset was not materialized after it)")
        hashes[m] = str(v.get("content_hash", ""))
        rows += int(v.get("dagster/row_count", 0) or 0)
    if not problems and rows != len(validated):
        problems.append(f"the window's months record {rows} validated rows but {len(validated)} were loaded; "
                        "materialize validated_dataset for those months again")
    if problems:
        raise DataValidationError(f"{spec.name}: training_splits reads the window {window_label(window)}, which is "
                                  "not ready: " + "; ".join(problems))
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    return {WINDOW_KEY: window_label(window), WINDOW_PARTITIONS: dg.MetadataValue.json(hashes), WINDOW_HASH: digest,
            "window_months": len(window)}


def split_rows(spec: PipelineSpec, validated: "pd.DataFrame",
               window: dict[str, Any] | None = None) -> "dg.Output[pd.DataFrame]":
    """Every validated row's split, with each split's size, positive rate, hash and first ids (and, for a
    partitioned spec, the window's months and their hashes)."""
    labels = assign_splits(validated, spec)
    splits = pd.DataFrame({ROW_ID: validated[ROW_ID].to_numpy(), SPLIT: labels.to_numpy()})
    meta: dict[str, Any] = {"strategy": spec.split.strategy, "seed": spec.split.seed,
                            "validated_hash": frame_hash(validated), **(window or {})}
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
    """raw_dataset, its blocking checks, validated_dataset and training_splits for one spec; the first two a month
    at a time when the spec has partitions."""
    with quiet_preview():
        return _definitions(loaded)


def _definitions(loaded: LoadedSpec) -> dg.Definitions:
    spec = loaded.spec
    raw_key, validated_key, splits_key = (asset_key(spec.name, n) for n in
                                          (naming.RAW_DATASET, naming.VALIDATED_DATASET, naming.TRAINING_SPLITS))
    learns = spec.monitoring.learn_from_outcomes
    partitioned = partitioned_asset_kwargs(spec)

    @dg.asset(key=raw_key, group_name=naming.DATA, required_resource_keys={"audit"} if learns else set(),
              **partitioned)
    def raw_dataset(context: dg.AssetExecutionContext) -> dg.Output[Frames]:
        """Snapshot of the spec's source as Parquet: content hash, schema, row count and a preview (and, when
        the spec learns from outcomes, the served decisions whose outcome came back, counted in metadata)."""
        if not learns:
            store, excluded = None, ()
        else:
            store = context.resources.audit.store()
            excluded = tuple(flagged(outcome_key_bursts(context.instance, store, spec.name))
                             if spec.monitoring.exclude_flagged_outcome_keys else ())
        keys = run_keys(context)
        if not keys:
            return snapshot_source(loaded, context.log, store, excluded)
        parts, metas, common = snapshot_months(loaded, keys, context.log, store, excluded)
        return partition_output(context, keys, parts, metas, common)

    specs = [dg.AssetCheckSpec(name=name, asset=raw_key, blocking=True, description=doc,
                               partitions_def=partitioned.get("partitions_def")) for name, doc in DATA_CHECKS.items()]

    @dg.multi_asset_check(specs=specs, name=f"{spec.name}__data_expectations", ins={"raw": dg.AssetIn(key=raw_key)})
    def data_expectations(context: dg.AssetCheckExecutionContext, storage: StorageResource, raw: DataFrameType):
        """The Great Expectations suite generated from the spec, one blocking check per family (a partitioned
        spec's months each on their own, against the validated months before them)."""
        keys = run_keys(context)
        if keys:
            yield from check_months(storage, spec, raw, keys, context.log)
        else:
            yield from check_results(storage, spec, raw, context.log)

    @dg.asset(key=validated_key, group_name=naming.DATA, ins={"raw": dg.AssetIn(key=raw_key)}, **partitioned)
    def validated_dataset(context: dg.AssetExecutionContext, storage: StorageResource,
                          raw: DataFrameType) -> dg.Output[Frames]:
        """Typed, cleaned rows of a snapshot that passed every data check; rows that break row-level rules
        (null target, repeated id, values outside declared rules) are set aside with their reason."""
        keys = run_keys(context)
        if not keys:
            return validate_snapshot(storage, spec, raw, context.log)
        parts = split_by_partition(raw, spec, keys)
        done = {k: validated_rows(storage, spec, parts[k], context.log, k) for k in sorted(keys)}
        return partition_output(context, keys, {k: v[0] for k, v in done.items()}, {k: v[1] for k, v in done.items()})

    @dg.asset(key=splits_key, group_name=naming.DATA, ins={"validated": dg.AssetIn(key=validated_key)})
    def training_splits(context: dg.AssetExecutionContext, validated: DataFrameType) -> dg.Output[DataFrameType]:
        """Deterministic train / validation / test assignment of every validated row, with a hash per split."""
        window = training_window(context.instance, spec, validated) if spec.partitioned else None
        return split_rows(spec, validated, window)

    assets = [with_note(raw_dataset, spec, "A month at a time: the source's rows whose time column falls in it."),
              with_note(validated_dataset, spec, "A month at a time, each against the validated months before it."),
              with_note(training_splits, spec, "Over the months of the training window (training.window), named "
                        "with their hashes; refused while a month inside it is missing or its newest snapshot failed "
                        "its checks.")]
    return dg.Definitions(assets=assets, asset_checks=[data_expectations])
