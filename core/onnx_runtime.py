"""A registered version's networks on ONNX Runtime: the sentence encoder (tokens -> pooled sentence vector) and
the tabular network (features -> logit), and the parity file that says which path a version serves on.

Registration (assets/onnx_parity.py) exports both from the version's own PyTorch modules, checks them against
those modules and writes `onnx.json` into the version's artifacts, signed with the rest of the folder; the
version's model code (workloads/model_code.py) reads it and serves each network on the path it names. This
module ships inside every version as `intelligentops_onnx.py` (like `intelligentops_features.py`), so it imports
nothing of the project; onnxruntime, tokenizers and numpy are imported inside functions.

Each session runs on one intra-op and one inter-op thread by default: a server runs one scoring thread per
worker process, and more threads per session only fight the other workers for the same cores
(`INTELLIGENTOPS_SERVE_THREADS`, which the server sets from `deployment.scoring_threads`, overrides it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PARITY_FILE = "onnx.json"
PARITY_FORMAT = 1
ENCODER_FP32 = "encoder.onnx"
ENCODER_INT8 = "encoder.int8.onnx"
NETWORK_FILE = "network.onnx"
# The blocking checks on a version's ONNX path (issue 19): below them the version serves on PyTorch, and says so.
MIN_COSINE = 0.98
MAX_AUC_DELTA = 0.002
MAX_NETWORK_DIFF = 1e-5
# Validation texts the cosine check reads at most (distinct, cleaned): enough for a stable mean, bounded in time.
MAX_COSINE_TEXTS = 2000
# The encoder paths, best first; "pytorch" is the fallback every version has.
PYTORCH = "pytorch"
ENCODER_PATHS = {"onnx-int8": ENCODER_INT8, "onnx-fp32": ENCODER_FP32}
THREADS_ENV = "INTELLIGENTOPS_SERVE_THREADS"


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session on `threads` intra-op threads (default: THREADS_ENV, else 1) and one inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.environ.get(THREADS_ENV, "1"))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def dynamically_quantized(path: str | Path) -> bool:
    """Whether the graph quantizes its activations at run time (DynamicQuantizeLinear, as quantize_dynamic writes
    the INT8 encoder). Such a graph computes each scale over the whole run's batch, so a text's vector depends on
    the texts run beside it (MiniLM INT8: cosine 0.989-0.992 between a text alone and in a batch of four)."""
    with open(path, "rb") as fh:
        return b"DynamicQuantizeLinear" in fh.read()


class OnnxEncoder:
    """Texts -> float32 sentence vectors, tokenized as sentence-transformers tokenizes (the encoder folder's fast
    tokenizer, truncated to max_seq_length, padded to the longest text of the batch) and pooled by the graph.

    A dynamically quantized graph runs one text at a time: each vector is then a function of its text alone, the
    same whether text_embeddings, evaluation or the server computes it (no train/serve skew from batching); an
    fp32 graph runs `batch_size` texts at a time (padding does not move its vectors beyond float rounding)."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_seq_length: int,
                 do_lower_case: bool = False, threads: int | None = None):
        from tokenizers import Tokenizer

        self.session = session(model_path, threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.enable_truncation(max_length=int(max_seq_length))
        pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else (tokenizer.token_to_id("[PAD]") or 0)
        tokenizer.enable_padding(pad_id=pad_id)
        self.tokenizer, self.do_lower_case = tokenizer, bool(do_lower_case)
        self.one_text_per_run = dynamically_quantized(model_path)

    def encode(self, texts, batch_size: int = 64):
        import numpy as np

        texts = [str(t).strip() for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        out = []
        batch_size = 1 if self.one_text_per_run else max(1, int(batch_size))
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(texts[start:start + batch_size])
            feed = {"input_ids": np.array([e.ids for e in batch], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64)}
            out.append(self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0])
        width = self.session.get_outputs()[0].shape[-1]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), dtype=np.float32)


class OnnxNetwork:
    """A float32 feature matrix -> the network's (rows, 1) logits."""

    def __init__(self, model_path: str | Path, threads: int | None = None):
        self.session = session(model_path, threads)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        import numpy as np

        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]


def read_parity(artifacts_dir: str | Path) -> dict[str, Any]:
    """The version's parity file; a version registered before ONNX export has none: PyTorch for both."""
    path = Path(artifacts_dir) / PARITY_FILE
    if not path.is_file():
        return {"encoder": {"path": PYTORCH, "reason": "no onnx.json in this version (registered before ONNX export)"},
                "network": {"path": PYTORCH, "reason": "no onnx.json in this version"}}
    parity = json.loads(path.read_text())
    if parity.get("format") != PARITY_FORMAT:
        raise ValueError(f"{path}: format {parity.get('format')!r}, this model code reads {PARITY_FORMAT}")
    return parity


def _figure(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def summary(parity: dict[str, Any], has_text: bool = True) -> str:
    """One line: which path each network of the version serves on and why (the server's log and status)."""
    enc, net = parity.get("encoder") or {}, parity.get("network") or {}
    parts = []
    if has_text:
        figures = f"cosine {_figure(enc.get('cosine'), '.4f')}, AUC delta {_figure(enc.get('auc_delta'), '.4f')}"
        parts.append(f"encoder: {enc.get('path', PYTORCH)} ({figures})" if enc.get("path", PYTORCH) != PYTORCH
                     else f"encoder: pytorch ({enc.get('reason', 'no ONNX encoder')})")
    if net.get("path") == "onnx":
        parts.append(f"network: onnx (max diff {_figure(net.get('max_diff'), '.1e')}, "
                     f"{_figure(net.get('onnx_ms_16'), '.3f')} vs {_figure(net.get('torch_ms_16'), '.3f')} ms per 16 rows)")
    else:
        parts.append(f"network: pytorch ({net.get('reason', 'no ONNX network')})")
    return "; ".join(parts)
