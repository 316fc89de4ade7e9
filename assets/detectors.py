"""A model version's drift detectors: fitted when the version is evaluated, loaded when a window it served is
reported.

They are fitted on the version's training split (tabular KS/Chi-squared, MMD on the text embeddings, KS and a
mean test on the held-out validation and test scores; core/drift/), saved under `<home>/<spec>/drift/v<version>/`
with a sha256 manifest beside the reference rows and scores, logged to the version's MLflow run and named by the
version tag `drift_detectors_sha256`. Loading refuses a bundle whose manifest is not the one the tag names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from assets.spec import PipelineSpec
from core.lazy import np, pd
from core.names import DETECTORS_TAG
from resources.mlflow import MlflowResource
from resources.storage import StorageResource, atomic_write_bytes

if TYPE_CHECKING:
    from core.drift import DetectorBundle


def detectors_dir(storage: StorageResource, spec_name: str, version: str) -> Path:
    return storage.local_dir(spec_name, "drift", f"v{version}")


def fit_version_detectors(spec: PipelineSpec, storage: StorageResource, mlflow: MlflowResource, version: str,
                          run_id: str | None, reference: pd.DataFrame, text_vectors: dict[str, np.ndarray],
                          held_out_scores: np.ndarray | None,
                          ood_inputs: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """Fit the version's detectors on its training split, keep the reference beside them, log both to the run.

    `ood_inputs` (the prepared feature matrix of training and held-out rows) adds the out-of-distribution
    detector the server scores every row with (core/ood.py), at `monitoring.ood_quantile`.
    Returns the sha256 of the detectors' manifest, also set as the version tag `drift_detectors_sha256`.
    """
    from core.drift import fit_detectors
    from core.files import sha256_file
    from resources.storage import frame_to_parquet_bytes

    m = spec.monitoring
    folder = detectors_dir(storage, spec.name, version)
    bundle_dir = folder / "detectors"
    fit_detectors(reference, list(spec.features.numeric), list(spec.features.categorical), text_vectors,
                  held_out_scores, bundle_dir, p_val=m.p_val, seed=spec.split.seed, min_window=m.min_window,
                  n_permutations=m.permutations, ood=ood_inputs, ood_quantile=m.ood_quantile)
    atomic_write_bytes(folder / "reference.parquet", frame_to_parquet_bytes(reference.reset_index(drop=True)))
    np.save(folder / "reference_scores.npy", np.asarray([] if held_out_scores is None else held_out_scores,
                                                        dtype=np.float64))
    digest = sha256_file(bundle_dir / "manifest.json")
    client = mlflow.client()
    if run_id:
        client.log_artifacts(run_id, str(bundle_dir), "drift_detectors")
    client.set_model_version_tag(spec.name, version, DETECTORS_TAG, digest)
    return digest


def load_version_detectors(storage: StorageResource, mlflow: MlflowResource, spec_name: str,
                           version: str) -> DetectorBundle:
    """The version's detectors, refused unless their manifest is the one the version's tag names."""
    from core.drift import DriftDetectorError, load_detectors
    from core.files import sha256_file

    folder = detectors_dir(storage, spec_name, version) / "detectors"
    expected = (mlflow.client().get_model_version(spec_name, version).tags or {}).get(DETECTORS_TAG)
    if not expected:
        raise DriftDetectorError(f"{spec_name} v{version} has no {DETECTORS_TAG} tag: its detectors were never "
                                 f"fitted; materialize {spec_name}/model_evaluation for it")
    if not (folder / "manifest.json").is_file() or sha256_file(folder / "manifest.json") != expected:
        raise DriftDetectorError(f"{folder}/manifest.json is not the manifest {expected[:16]}... that {spec_name} "
                                 f"v{version} was evaluated with; re-evaluate that version")
    return load_detectors(folder)


def reference_of(storage: StorageResource, spec_name: str, version: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows and held-out scores the version's detectors were fitted on (for the drift plot)."""
    folder = detectors_dir(storage, spec_name, version)
    return pd.read_parquet(folder / "reference.parquet"), np.load(folder / "reference_scores.npy")
