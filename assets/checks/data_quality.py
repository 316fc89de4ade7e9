"""Great Expectations suites generated from a spec, run against a raw snapshot.

The suite is built from what the spec says (columns, their kinds, declared rules) and from the profile of
the last validated snapshot (learned ranges, category sets and null rates). Each expectation carries the name of the
blocking asset check it belongs to, so one GX validation feeds every data check at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from assets.spec import PipelineSpec
from core.lazy import pd

# The asset checks on raw_dataset, in the order the UI lists them, with what each one guards.
DATA_CHECKS: dict[str, str] = {
    "columns_present": "Every column the spec reads exists in the snapshot.",
    "column_types": "Numeric features hold numbers; text and categorical features hold text or numbers.",
    "null_rates": "No column has more nulls than the spec allows or, where it says nothing, than the last validated "
                  "snapshot had plus a tolerance; ids never null.",
    "value_ranges": "Numeric values inside declared or learned ranges; categories inside the allowed set.",
    "unique_ids": "The id column has no duplicate values.",
    "row_count": "The snapshot has a plausible number of rows and both target classes.",
}

NUMERIC_TYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                 "float64", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32",
                 "Float64", "bool", "boolean"]
TEXTUAL_TYPES = ["object", "string", "str", "category", *NUMERIC_TYPES]


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    failures: tuple[str, ...] = ()
    evaluated: int = 0
    notes: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        if self.passed:
            return f"{self.evaluated} expectation(s) passed" + (f"; {'; '.join(self.notes)}" if self.notes else "")
        return "; ".join(self.failures)


@dataclass
class _Planned:
    check: str
    expectation: Any
    column: str | None
    learned_null_rate: float | None = None


# A month's null rate is a sample of the months before it: it may stray this many of its standard errors.
MONTH_NULL_SIGMAS = 4.0


def null_tolerance(learned: float, month_rows: int | None = None) -> float:
    """How far a column's null rate may rise above the last validated snapshot's before the snapshot is refused.

    Two points at least: a complete column may lose a few values (2 rows in 100) without alarm, but not the
    14% that an upstream join dropping a field gives. Half the learned rate for partly empty columns: binomial
    noise at a 10% rate over 1,000 rows is about one point, so 5 points is far outside noise, yet a column
    whose null rate doubles is refused. A month of a partitioned spec (`month_rows`) is one sample of its
    column: it may also stray MONTH_NULL_SIGMAS binomial standard errors, which matters only for small months
    (300 rows at a 6% rate: 5.5 points rather than 3) and vanishes from a few thousand rows on.
    """
    noise = MONTH_NULL_SIGMAS * (learned * (1 - learned) / month_rows) ** 0.5 if month_rows else 0.0
    return max(0.02, 0.5 * learned, noise)


@dataclass(frozen=True)
class Profile:
    """What the last validated snapshot looked like; the reference for learned expectations."""

    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    row_count: int = 0
    null_rates: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def of(df: pd.DataFrame, spec: PipelineSpec, raw: pd.DataFrame) -> Profile:
        """Ranges and categories of the cleaned rows `df`; null rates of the raw snapshot `raw` they came from.

        Null rates come from the raw snapshot because that is what the null_rates check measures: cleaning
        turns missing text into "" and sets aside rows with a null target, so the cleaned rows understate them.
        """
        numeric: dict[str, tuple[float, float]] = {}
        for col in spec.features.numeric:
            s = pd.to_numeric(df[col], errors="coerce").replace([math.inf, -math.inf], float("nan")).dropna()
            if len(s):
                numeric[col] = (float(s.min()), float(s.max()))
        categories = {
            col: sorted({str(v) for v in df[col].dropna().unique()})[:500] for col in spec.features.categorical
        }
        null_rates = {col: round(float(raw[col].isna().mean()), 6) for col in spec.columns
                      if col in raw.columns and len(raw)}
        return Profile(numeric=numeric, categories=categories, row_count=len(df), null_rates=null_rates)

    @staticmethod
    def merge(profiles: list[Profile]) -> Profile | None:
        """One profile for several months: ranges and category sets joined, null rates weighted by rows."""
        if not profiles:
            return None
        numeric: dict[str, tuple[float, float]] = {}
        categories: dict[str, set[str]] = {}
        nulls: dict[str, tuple[float, int]] = {}
        for p in profiles:
            for col, (lo, hi) in p.numeric.items():
                old = numeric.get(col, (lo, hi))
                numeric[col] = (min(old[0], lo), max(old[1], hi))
            for col, values in p.categories.items():
                categories.setdefault(col, set()).update(values)
            for col, rate in p.null_rates.items():
                total, rows = nulls.get(col, (0.0, 0))
                weight = max(p.row_count, 1)
                nulls[col] = (total + rate * weight, rows + weight)
        return Profile(numeric=numeric, categories={c: sorted(v)[:500] for c, v in categories.items()},
                       row_count=sum(p.row_count for p in profiles),
                       null_rates={c: round(t / n, 6) for c, (t, n) in nulls.items()})

    def to_json(self) -> dict[str, Any]:
        return {"numeric": {k: list(v) for k, v in self.numeric.items()}, "categories": self.categories,
                "row_count": self.row_count, "null_rates": self.null_rates}

    @staticmethod
    def from_json(obj: dict[str, Any] | None) -> Profile | None:
        if not obj:
            return None
        return Profile(numeric={k: (float(v[0]), float(v[1])) for k, v in obj.get("numeric", {}).items()},
                       categories={k: list(v) for k, v in obj.get("categories", {}).items()},
                       row_count=int(obj.get("row_count", 0)),
                       null_rates={k: float(v) for k, v in obj.get("null_rates", {}).items()})


def _plan(df: pd.DataFrame, spec: PipelineSpec, profile: Profile | None,
          month: bool = False) -> tuple[list[_Planned], list[str]]:
    import great_expectations as gx

    E = gx.expectations
    v = spec.validation
    present = set(df.columns)
    plan: list[_Planned] = []
    notes: list[str] = []

    def add(check: str, column: str | None, exp: Any, learned_null_rate: float | None = None) -> None:
        plan.append(_Planned(check, exp, column, learned_null_rate))

    for col in spec.columns:
        add("columns_present", col, E.ExpectColumnToExist(column=col))

    for col in spec.features.numeric:
        if col in present:
            add("column_types", col, E.ExpectColumnValuesToBeInTypeList(column=col, type_list=NUMERIC_TYPES))
    for col in [*spec.features.categorical, *spec.features.text]:
        if col in present:
            add("column_types", col, E.ExpectColumnValuesToBeInTypeList(column=col, type_list=TEXTUAL_TYPES))

    for col in spec.columns:
        if col not in present:
            continue
        rule = v.columns.get(col)
        learned = None
        if col == spec.id_column:
            allowed = 0.0
        elif rule is not None and rule.max_null_fraction is not None:
            allowed = rule.max_null_fraction
        elif "max_null_fraction" in v.model_fields_set:  # written in the spec, not the default: it wins
            allowed = v.max_null_fraction
        elif profile is not None and col in profile.null_rates:
            learned = profile.null_rates[col]
            allowed = min(1.0, learned + null_tolerance(learned, len(df) if month else None))
        else:  # no validated snapshot yet (or a column new to the spec): the default bound
            allowed = v.max_null_fraction
        mostly = round(1.0 - allowed, 6)
        if mostly > 0:
            add("null_rates", col, E.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly), learned)

    outlier_mostly = round(1.0 - v.max_out_of_range_fraction, 6)
    numeric_ok = {c for c in spec.features.numeric if c in present and pd.api.types.is_numeric_dtype(df[c])}
    range_cols = [*spec.features.numeric, *[c for c in v.columns if c not in spec.features.numeric]]
    for col in range_cols:
        if col not in present:
            continue
        rule = v.columns.get(col)
        lo = rule.min if rule is not None else None
        hi = rule.max if rule is not None else None
        if profile is not None and col in profile.numeric:
            pmin, pmax = profile.numeric[col]
            margin = v.range_tolerance * max(pmax - pmin, abs(pmax), abs(pmin), 1.0)
            lo = pmin - margin if lo is None else lo
            hi = pmax + margin if hi is None else hi
        if (lo is not None or hi is not None) and (col in numeric_ok or pd.api.types.is_numeric_dtype(df[col])):
            add("value_ranges", col, E.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi,
                                                                      mostly=outlier_mostly))
    for col in [*spec.features.categorical, *[c for c in v.columns if c not in spec.features.categorical]]:
        if col not in present:
            continue
        rule = v.columns.get(col)
        if rule is not None and rule.allowed is not None:
            add("value_ranges", col, E.ExpectColumnValuesToBeInSet(column=col, value_set=list(rule.allowed),
                                                                    mostly=outlier_mostly))
        elif profile is not None and col in profile.categories and col in spec.features.categorical:
            # The profile stores categories as text; numeric codes are matched as numbers too.
            learned = profile.categories[col]
            add("value_ranges", col, E.ExpectColumnValuesToBeInSet(column=col, value_set=learned + [
                _maybe_number(x) for x in learned if _maybe_number(x) is not None], mostly=outlier_mostly))
    if profile is None:
        notes.append("no validated snapshot yet: ranges and categories not declared in the spec are learned "
                     "from this one")

    if spec.id_column and spec.id_column in present:
        add("unique_ids", spec.id_column, E.ExpectColumnValuesToBeUnique(column=spec.id_column))
    add("row_count", None, E.ExpectTableRowCountToBeBetween(min_value=v.min_rows, max_value=v.max_rows))
    return plan, notes


def _maybe_number(x: str) -> float | int | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f


def _short(values: list[Any], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in values[:n])
    return f"[{shown}{', ...' if len(values) > n else ''}]"


def _describe_failure(exp_type: str, column: str | None, kwargs: dict[str, Any], result: dict[str, Any],
                      learned_null_rate: float | None = None, month: bool = False) -> str:
    where = f"column '{column}'" if column else "table"
    pct = result.get("unexpected_percent")
    sample = result.get("partial_unexpected_list") or []
    mostly = kwargs.get("mostly")
    allowed = f" (at most {100 * (1 - mostly):.1f}% allowed)" if mostly is not None and mostly < 1 else ""
    if exp_type == "expect_column_to_exist":
        detail = "is missing from the source"
    elif exp_type == "expect_column_values_to_be_in_type_list":
        detail = f"has values of the wrong type, e.g. {_short(sample, 3)}; expected numbers"
    elif exp_type == "expect_column_values_to_not_be_null" and learned_null_rate is not None:
        detail = (f"is {pct:.1f}% null, up from {100 * learned_null_rate:.1f}% in the last validated snapshot (at "
                  f"most {100 * (1 - mostly):.1f}% allowed: that rate plus max(2 points, half of it"
                  f"{', 4 standard errors of this month' if month else ''})); if the "
                  f"change is expected, set validation.columns.{column}.max_null_fraction in the spec")
    elif exp_type == "expect_column_values_to_not_be_null":
        detail = f"is {pct:.1f}% null{allowed}"
    elif exp_type == "expect_column_values_to_be_between":
        detail = (f"has {pct:.2f}% of values outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
                  f"{allowed}, e.g. {_short(sample)}")
    elif exp_type == "expect_column_values_to_be_in_set":
        detail = f"has {pct:.2f}% of values outside the allowed set{allowed}, e.g. {_short(sample)}"
    elif exp_type == "expect_column_values_to_be_unique":
        detail = f"has duplicate ids, e.g. {_short(sample)}"
    elif exp_type == "expect_table_row_count_to_be_between":
        detail = (f"has {result.get('observed_value')} rows, expected between {kwargs.get('min_value')} and "
                  f"{kwargs.get('max_value') or 'any'}")
    else:
        detail = f"failed ({result})"
    return f"{where} {detail} [{exp_type}]"


def validate_frame(df: pd.DataFrame, spec: PipelineSpec, profile: Profile | None,
                   month: bool = False) -> list[CheckOutcome]:
    """Run the generated suite on `df`; one outcome per data check, failures naming column and expectation.
    `month`: `df` is one month of a partitioned spec, a sample of the months before it (null_tolerance)."""
    import great_expectations as gx

    plan, notes = _plan(df, spec, profile, month)
    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False}
    except Exception:  # older or newer GX without this knob: only cosmetic
        pass
    batch = (
        ctx.data_sources.add_pandas("snapshot")
        .add_dataframe_asset(spec.name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    for i, p in enumerate(plan):
        p.expectation.meta = {"check": p.check, "column": p.column, "order": i,
                              "learned_null_rate": p.learned_null_rate}
    # Built whole: add_expectation compares each new expectation with every one before it (quadratic, about a
    # second for this suite), and the plan holds no duplicates to find.
    suite = gx.ExpectationSuite(name=f"{spec.name}_raw", expectations=[p.expectation for p in plan])
    result = batch.validate(suite)

    failures: dict[str, list[str]] = {name: [] for name in DATA_CHECKS}
    counts: dict[str, int] = {name: 0 for name in DATA_CHECKS}
    for r in sorted(result.results, key=lambda r: r.expectation_config.meta.get("order", 0)):
        cfg = r.expectation_config
        check = cfg.meta.get("check", "row_count")
        counts[check] += 1
        if not r.success:
            exc = r.exception_info if isinstance(r.exception_info, dict) else {}
            if exc.get("raised_exception"):
                failures[check].append(f"column '{cfg.meta.get('column')}' could not be evaluated "
                                       f"[{cfg.type}]: {exc.get('exception_message')}")
            else:
                failures[check].append(_describe_failure(cfg.type, cfg.meta.get("column"), cfg.kwargs, r.result,
                                                         cfg.meta.get("learned_null_rate"), month))

    # Both classes must be present for a binary target; GX has no one-line expectation for that.
    if spec.target.column in df.columns:
        counts["row_count"] += 1
        labels = label_series(df[spec.target.column], spec)
        n_pos = int(labels.sum())
        n_neg = int((labels == 0).sum())
        if n_pos == 0 or n_neg == 0:
            failures["row_count"].append(
                f"column '{spec.target.column}' has {n_pos} positive and {n_neg} negative rows for positive "
                f"values {spec.target.positive}; a binary target needs both [target_has_both_classes]")
    if not spec.id_column:
        notes.append("no id_column: rows are numbered in source order")
    return [
        CheckOutcome(name=name, passed=not failures[name], failures=tuple(failures[name]), evaluated=counts[name],
                     notes=tuple(notes) if name == "value_ranges" else ())
        for name in DATA_CHECKS
    ]


def label_series(target: pd.Series, spec: PipelineSpec) -> pd.Series:
    """1 where the target holds a positive value, 0 where it holds another, NA where it is null."""
    positive = spec.target.positive
    if pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target):
        nums = [float(p) for p in positive if _maybe_number(str(p)) is not None and not isinstance(p, bool)]
        hit = target.astype("float64").isin(nums)
    else:
        hit = target.astype("string").isin([str(p) for p in positive])
    out = hit.astype("Int64")
    out[target.isna()] = pd.NA
    return out
