"""Time partitions of a spec that asks for them (`partitions: {grain: month, start: YYYY-MM}` over `time_column`).

The partitions definition is built from the spec alone, so the code location knows every month without reading any
data. A row belongs to the month its time column falls in (UTC); rows without a parsable time belong to none. A run
covers one month or, as a single-run backfill (`dagster asset materialize --partition-range A...B`), a range of
them: a partitioned asset then reads the range as one frame and writes a `{month: frame}` mapping, which the IO
manager (resources/storage.py) stores a file per month.

The stages and the drift sensor share this module; it sits below them so that none imports another.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg

from assets import naming
from assets.spec import PipelineSpec
from core.lazy import pd
from resources.storage import WINDOW_METADATA

# What a partitioned asset returns: one month's frame, or a range's {month: frame} (Dagster types it as Any).
Frames = Any

MONTH_FORMAT = "%Y-%m"
# training_splits' metadata naming its window; model_checkpoint copies them into the version's lineage tags.
WINDOW_KEY = "data_window"              # "2016-04...2018-03"
WINDOW_PARTITIONS = "data_partitions"   # {month: validated_dataset content hash}
WINDOW_HASH = "data_partitions_hash"    # sha256 of that mapping


class PartitionError(ValueError):
    """Rows or a run that do not fit the spec's partitions; the message names the column, month or key."""


def partitions_def(spec: PipelineSpec) -> dg.MonthlyPartitionsDefinition | None:
    """One partition per month from `partitions.start` (to `partitions.end`, or the last complete month), keyed
    `YYYY-MM`; None for a spec that does not opt in."""
    p = spec.partitions
    if p is None:
        return None
    end = None if p.end is None else (pd.Period(p.end, freq="M") + 1).strftime(MONTH_FORMAT)
    return dg.MonthlyPartitionsDefinition(start_date=p.start, end_date=end, fmt=MONTH_FORMAT)


def partitioned_asset_kwargs(spec: PipelineSpec) -> dict[str, Any]:
    """What a partitioned asset of this spec adds to `@dg.asset`: the months, one run per backfill (a range is read
    once and split), and the training window its unpartitioned readers see (resources/storage.py)."""
    pdef = partitions_def(spec)
    if pdef is None:
        return {}
    window = spec.training.window
    return {"partitions_def": pdef, "backfill_policy": dg.BackfillPolicy.single_run(),
            "metadata": {WINDOW_METADATA: window.months if window is not None else 0}}


def with_note(asset: dg.AssetsDefinition, spec: PipelineSpec, note: str) -> dg.AssetsDefinition:
    """A partitioned spec's asset described by its docstring plus how it treats months; an unpartitioned spec's
    keeps its docstring alone, so its graph reads as before."""
    if not spec.partitioned:
        return asset
    return asset.map_asset_specs(lambda s: s.replace_attributes(description=f"{s.description}\n\n{note}"))


@contextmanager
def quiet_preview() -> Iterator[None]:
    """Dagster marks two arguments partitioned specs need as beta or preview: `backfill_policy` (a range backfill
    in one run, the only kind `dagster asset materialize --partition-range` runs) and `AssetCheckSpec(partitions_def=
    ...)` (how a check reads its run's month rather than every month). Their warnings say nothing a user can act
    on, so a code location that defines them does not print them on every load; docs/pipelines.md says it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")
        warnings.filterwarnings("ignore", message=".*`backfill_policy` of function `asset`.*")
        yield


def parse_time(values: pd.Series) -> pd.Series:
    """Numbers stay numbers; text such as 'Mar-2018' or '2018-03-01' becomes a timestamp."""
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
        return values
    for fmt in ("%b-%Y", "%Y-%m-%d", "%Y-%m", "ISO8601"):
        parsed = pd.to_datetime(values, format=fmt, errors="coerce")
        if parsed.notna().sum() >= 0.9 * values.notna().sum():
            return parsed
    return pd.to_datetime(values, format="mixed", errors="coerce")


def month_keys(spec: PipelineSpec, values: pd.Series) -> pd.Series:
    """Each row's partition key (`YYYY-MM`, UTC), or None where its time is missing or unparsable."""
    column = spec.time_column
    parsed = parse_time(values)
    if not pd.api.types.is_datetime64_any_dtype(parsed):
        raise PartitionError(f"{spec.name}: time column {column!r} holds numbers ({values.dtype}); partitions need "
                             f"dates or timestamps (e.g. '2018-03-01', 'Mar-2018')")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    keys = parsed.dt.strftime(MONTH_FORMAT)
    return keys.where(parsed.notna(), None)


def split_by_partition(frame: pd.DataFrame, spec: PipelineSpec, keys: Sequence[str],
                       months: pd.Series | None = None) -> dict[str, pd.DataFrame]:
    """The rows of each of `keys`, in the frame's order, index reset; rows of other months are left out.

    `months` (one key per row of `frame`) saves parsing the time column again when the caller has it.
    """
    return split_aligned(frame, month_keys(spec, frame[spec.time_column]) if months is None else months, keys)


def split_aligned(frame: pd.DataFrame, months: pd.Series, keys: Sequence[str]) -> dict[str, pd.DataFrame]:
    """`frame` cut by `months`, a key per row of another frame the same rows came from (embeddings of validated
    rows, say), for frames that carry no time column of their own."""
    if len(frame) != len(months):
        raise PartitionError(f"{len(frame)} rows cannot be cut by the months of {len(months)} rows")
    return {k: frame[(months == k).to_numpy()].reset_index(drop=True) for k in keys}


def run_keys(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> list[str]:
    """The months a run covers: one, or a single-run backfill's range, in time order; [] when unpartitioned."""
    op = context.op_execution_context if isinstance(context, dg.AssetCheckExecutionContext) else context
    if op.has_partition_key:
        return [op.partition_key]
    if op.has_partition_key_range:
        return list(op.partition_keys)
    return []


def partition_output(context: dg.AssetExecutionContext, keys: list[str], values: dict[str, Any],
                     metas: dict[str, dict[str, Any]], common: dict[str, Any] | None = None,
                     version_key: str = "content_hash") -> dg.Output:
    """One month's value with its metadata and data version (from its `version_key` metadata), or a range's
    `{month: value}` with each month's metadata on its own materialization."""
    common = common or {}
    if len(keys) == 1:
        meta = {**common, **metas[keys[0]]}
        digest = meta.get(version_key)
        return dg.Output(values[keys[0]], metadata=meta,
                         data_version=dg.DataVersion(str(digest)[:16]) if digest else None)
    for k in keys:
        context.add_asset_metadata(metas[k], partition_key=k)
    return dg.Output({k: values[k] for k in keys}, metadata={**common, "partitions": window_label(keys)})


def window_bounds(keys: Sequence[str]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The first instant of the first month and of the month after the last: a SQL source's bound parameters."""
    first, last = pd.Period(min(keys), freq="M"), pd.Period(max(keys), freq="M")
    return first.start_time, (last + 1).start_time


def window_label(keys: Sequence[str]) -> str:
    """`first...last` of a list of months, as backfills and the UI write a range; "none" when empty."""
    return f"{keys[0]}...{keys[-1]}" if keys else "none"


def newest_month(instance: dg.DagsterInstance, spec: PipelineSpec) -> str | None:
    """The newest month raw_dataset has materialized: where the current training window ends, and the partition a
    retrain snapshots again (late rows, outcomes learned since). None before the first month."""
    months = instance.get_materialized_partitions(naming.asset_key(spec.name, naming.RAW_DATASET))
    return max(months) if months else None
