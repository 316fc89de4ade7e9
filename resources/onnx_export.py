"""Export a version's PyTorch networks to ONNX: the sentence encoder (tokens -> pooled, normalized vector) and the
tabular network (features -> logit), and quantize the encoder's weights to INT8.

The TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) traces the modules as they are, so the graph
is the version's own encoder and network, whatever they were fine-tuned or built into. What the exported graphs
are checked against and how the path is chosen: assets/onnx_parity.py; how they run: core/onnx_runtime.py.
torch, sentence-transformers and onnxruntime are imported inside functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPSET = 17


class OnnxExportError(RuntimeError):
    """A network could not be exported; the version serves it on PyTorch and says why."""


def encoder_settings(encoder: Any) -> dict[str, Any]:
    """What tokenizing like sentence-transformers needs: max_seq_length and do_lower_case of its first module."""
    first = encoder[0]
    return {"max_seq_length": int(encoder.max_seq_length), "do_lower_case": bool(getattr(first, "do_lower_case", False))}


def export_encoder(encoder: Any, target: Path, normalize: bool) -> dict[str, Any]:
    """Write `encoder` (a SentenceTransformer) as one ONNX graph: input_ids, attention_mask, token_type_ids ->
    `sentence_embedding` (its own modules: transformer, pooling, normalization; L2-normalized at the end too when
    the version encodes with normalize_embeddings). Returns encoder_settings."""
    import torch

    class Sentence(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.encoder({"input_ids": input_ids, "attention_mask": attention_mask,
                                "token_type_ids": token_type_ids})["sentence_embedding"]
            return torch.nn.functional.normalize(out, p=2, dim=1) if normalize else out

    encoder.eval()
    tokens = encoder.tokenize(["an example job title", "a second one"])
    names = ("input_ids", "attention_mask", "token_type_ids")
    if "token_type_ids" not in tokens:
        tokens["token_type_ids"] = torch.zeros_like(tokens["input_ids"])
    args = tuple(tokens[n] for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    try:
        with torch.inference_mode():
            torch.onnx.export(Sentence().eval(), args, str(target), input_names=list(names),
                              output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
    except Exception as exc:  # the exporter's errors are many and specific; the caller falls back to PyTorch
        raise OnnxExportError(f"the text encoder could not be exported to ONNX ({type(exc).__name__}: {exc})") from exc
    return encoder_settings(encoder)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic INT8 quantization of `source`'s weights (activations quantized per batch at run time), one scale per
    output channel: per-tensor scales cost MiniLM about 0.04 of cosine (0.96), per channel 0.01 (0.99)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def export_network(net: Any, in_features: int, target: Path) -> None:
    """Write the tabular network (float32 (rows, in_features) -> (rows, 1) logits) as one ONNX graph."""
    import torch

    example = torch.zeros(2, int(in_features), dtype=torch.float32)
    try:
        with torch.inference_mode():
            torch.onnx.export(net.eval(), (example,), str(target), input_names=["features"], output_names=["logit"],
                              dynamic_axes={"features": {0: "rows"}, "logit": {0: "rows"}}, opset_version=OPSET,
                              dynamo=False)
    except Exception as exc:  # a user's factory network may hold what the tracer cannot follow
        raise OnnxExportError(f"the network could not be exported to ONNX ({type(exc).__name__}: {exc})") from exc


def cosine(a: Any, b: Any) -> Any:
    """Row-wise cosine similarity of two (rows, dim) matrices: how close the ONNX path's vectors are to PyTorch's."""
    import numpy as np

    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def milliseconds(call: Callable[[], Any], repeats: int = 50) -> float:
    """Median wall time of `call` in milliseconds, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2]
