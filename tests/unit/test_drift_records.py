"""What the drift report, the sensor and its cursor write and read back: one typed record per side of each key."""

from __future__ import annotations

import dagster as dg

from assets.drift_sensor import RetrainOutcome, SensorCursor
from assets.window_report import ReportRecord, WindowReport

RESULT = {"status": "scored", "window_size": 1000, "message": "2 of 3 detectors flagged drift",
          "detectors": [{"name": "tabular", "statistic": 0.21, "p_value": 0.001, "threshold": 0.05, "drift": True}],
          "features_moved": {"annual_income": {"direction": "up", "test": "ks", "effect": 0.4, "before": 60000.0,
                                               "after": 90000.0, "category": None}}}


def report(**over) -> WindowReport:
    base = dict(window="0000000001-0000001000", first_seq=1, last_seq=1000, model_version="3", drift=True,
                result=RESULT, outcomes=400, live_auc=0.61, performance_drop=True, plot=None)
    return WindowReport(**{**base, **over})


def as_stored(metadata: dict) -> dict:
    """Metadata as a materialization hands it back: every value wrapped in a MetadataValue."""
    return dict(dg.AssetMaterialization("x", metadata=metadata).metadata)


def test_the_sensor_reads_back_what_the_report_wrote():
    written = report()
    meta = written.to_metadata()
    assert meta["retrain_requested_by_sensor"] is True and meta["live_auc"] == 0.61 and meta["decisions"] == 1000
    read = ReportRecord.from_metadata(as_stored(meta))
    assert read == written.record()
    assert read.trigger == "drift" and read.model_version == "3"
    assert read.evidence == "window 0000000001-0000001000 served by v3; drift in annual_income; live AUC 0.610 on " \
                            "400 outcomes under the floor"
    calm = ReportRecord.from_metadata(as_stored(report(drift=False, performance_drop=False).to_metadata()))
    assert not calm.retrain_requested


def test_a_report_written_with_fewer_keys_still_reads():
    """Reports written before a key existed (or by hand) read with defaults; the partition names the window and
    the message stands in for missing evidence."""
    read = ReportRecord.from_metadata(as_stored({"drift": False, "performance_drop": True,
                                                 "retrain_requested_by_sensor": True, "message": "no drift"}),
                                      partition="0000000001-0000001000")
    assert read.window == "0000000001-0000001000" and read.evidence == "no drift" and read.trigger == "performance"


def test_a_retrain_outcome_round_trips_and_other_observations_are_not_one():
    done = RetrainOutcome(run_id="abc", outcome="refused", reason="fairness: region: demographic parity difference",
                          champion_version="unchanged")
    assert done.to_metadata()["retrain_outcome"] == "refused"
    assert RetrainOutcome.from_metadata(as_stored(done.to_metadata())) == done
    assert RetrainOutcome.from_metadata(as_stored({"window": "1-2"})) is None


def test_old_cursors_parse():
    assert SensorCursor.parse(None) == SensorCursor()
    old = SensorCursor.parse('{"seq": 2000, "event_id": 7, "last_retrain": 12.5}')
    assert (old.seq, old.event_id, old.last_retrain, old.outcome_id, old.retrains_until) == (2000, 7, 12.5, 0, 0.0)
    assert SensorCursor.parse(old.dump()) == old
