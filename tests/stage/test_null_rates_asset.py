"""A column that arrives emptier than it was learned is refused on a real instance, the last good snapshot kept."""

from pathlib import Path

import dagster as dg

from orchestration.definitions import build_definitions
from null_rates_support import emptied, loans, spec
from support import failure_text, materialize, write_spec


def test_a_complete_column_arriving_14_percent_empty_is_refused_and_last_good_kept(home: Path, pipelines: Path,
                                                                                    instance):
    df = loans()
    df.to_csv(pipelines / "loans.csv", index=False)
    write_spec(pipelines, spec())
    defs = build_definitions(pipelines)
    first = materialize(defs, instance, 'key:"loans/*" and group:data')
    assert first.success, failure_text(first)
    validated_path = home / "assets" / "loans" / "validated_dataset.parquet"
    good_bytes = validated_path.read_bytes()
    key = dg.AssetKey(["loans", "validated_dataset"])
    good_events = len(instance.fetch_materializations(key, limit=100).records)

    # 14% empty passed the old fixed 25% bound; purpose was complete in the last validated snapshot.
    emptied(df, "purpose", 0.14).to_csv(pipelines / "loans.csv", index=False)
    second = materialize(defs, instance, 'key:"loans/*" and group:data')
    assert not second.success
    evaluations = {c.check_name: c for c in second.get_asset_check_evaluations()}
    assert not evaluations["null_rates"].passed
    text = evaluations["null_rates"].description
    for words in ("column 'purpose'", "14.0% null", "up from 0.0% in the last validated snapshot",
                  "at most 2.0% allowed", "validation.columns.purpose.max_null_fraction",
                  "[expect_column_values_to_not_be_null]"):
        assert words in text, f"{words!r} not in {text!r}"
    # Only the emptied column is named: the others keep their learned (zero) rate.
    assert "income" not in text and "region" not in text
    assert validated_path.read_bytes() == good_bytes
    assert len(instance.fetch_materializations(key, limit=100).records) == good_events
