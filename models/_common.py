"""Shared helpers for training and exporting the bundled digits reference models.

These helpers are used only by the ``models/train_*.py`` scripts.  They import
torch, which is a training-time dependency only: nothing outside ``models/``
may import this module.

Every artifact a script writes is a pure function of the fixed seeds, the
sklearn ``load_digits`` data and the library versions, so re-running a script
regenerates the same files (bit-identical on the same machine type and thread
count).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

logger = logging.getLogger(__name__)

#: Directory holding the bundled models (this file's directory).
MODELS_DIR: Path = Path(__file__).resolve().parent

#: Opset used for every bundled model.
OPSET: int = 17

#: IR version written into every bundled model (opset 17 needs IR >= 8;
#: onnxruntime 1.31 accepts IR <= 13).
IR_VERSION: int = 8

#: Fixed split and sampling parameters shared by all digits models.
SPLIT_SEED: int = 0
EVAL_SIZE: int = 360
N_CALIB: int = 256
CALIB_SEED: int = 1234

#: Number of intra-op threads used for training (fixed for reproducibility).
TORCH_THREADS: int = 2


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed stratified train/eval split of sklearn's ``load_digits``.

    Attributes:
        x_train: raw pixel intensities, int64 in ``[0, 16]``, shape ``[1437, 64]``.
        y_train: labels, int64, shape ``[1437]``.
        x_eval: raw pixel intensities, int64, shape ``[360, 64]``.
        y_eval: labels, int64, shape ``[360]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def setup_logging() -> None:
    """Configure a simple console log format for the training scripts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and make torch deterministic on CPU.

    Args:
        seed: the seed used for every generator.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)


def load_split() -> DigitsSplit:
    """Load ``load_digits`` and split it 1437/360, stratified, ``random_state=0``.

    Returns:
        The fixed split, with raw integer pixel intensities.
    """
    digits = load_digits()
    x = digits.data.astype(np.int64)  # values 0..16, shape [1797, 64]
    y = digits.target.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        x, y, test_size=EVAL_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    logger.info("digits split: %d train / %d eval", len(x_tr), len(x_ev))
    return DigitsSplit(x_tr, y_tr, x_ev, y_ev)


def calib_indices(n_train: int, n: int = N_CALIB, seed: int = CALIB_SEED) -> np.ndarray:
    """Pick ``n`` distinct train-split indices for the calibration set.

    Args:
        n_train: size of the train split.
        n: number of calibration samples.
        seed: seed of the dedicated numpy generator.

    Returns:
        Sorted int64 indices into the train split.
    """
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=n, replace=False)).astype(np.int64)


def count_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters of ``model`` (before any BN folding)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield shuffled index batches covering ``range(n)`` once.

    Args:
        n: number of samples.
        batch_size: batch size (the last batch may be smaller).
        generator: torch generator that drives the permutation.
    """
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Eval-mode top-1 accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    acc = float((model(x).argmax(dim=1) == y).float().mean().item())
    model.train(was_training)
    return acc


def train_classifier(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float = 0.0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    seed: int = 0,
    log_every: int = 10,
) -> float:
    """Train ``model`` with AdamW and a one-cycle cosine schedule.

    Args:
        model: the classifier, returning logits ``[N, 10]``.
        x_train, y_train: training inputs and labels.
        x_eval, y_eval: eval inputs and labels (only logged, never used to select).
        epochs: number of passes over the train split.
        batch_size: minibatch size.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: optional ``f(batch, generator) -> batch`` train-time augmentation.
        seed: seed of the generator driving shuffling and augmentation.
        log_every: log every this many epochs.

    Returns:
        Wall-clock training time in seconds.
    """
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for idx in iterate_minibatches(len(x_train), batch_size, gen):
            xb, yb = x_train[idx], y_train[idx]
            if augment is not None:
                xb = augment(xb, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.item()) * len(idx)
        if epoch % log_every == 0 or epoch == epochs:
            logger.info(
                "epoch %3d  loss %.4f  train acc %.4f  eval acc %.4f",
                epoch,
                total / len(x_train),
                torch_accuracy(model, x_train, y_train),
                torch_accuracy(model, x_eval, y_eval),
            )
    model.eval()
    return time.perf_counter() - t0


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Replace every top-level ``Constant`` node with an initializer of the same name.

    Returns:
        The number of Constant nodes replaced.
    """
    keep: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            replaced += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return replaced


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique, readable name (keeping the exporter's names when unique).

    Unnamed nodes become ``/<OpType>_<index>``; a duplicate name gets a ``_<k>`` suffix.
    """
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        base = node.name or f"/{node.op_type}_{i}"
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        node.name = name


def _rename_initializers(graph: onnx.GraphProto) -> int:
    """Rename anonymous exporter initializers (``onnx::Conv_123``) after their first consumer.

    The TorchScript exporter gives BN-folded weights names like ``onnx::Conv_145``;
    this renames them ``<consumer node name>.<input slot name>`` (e.g.
    ``/stem/stem.0/Conv.W``, or ``/layers.0/attn/Unsqueeze.in1`` for a
    non-weight input), which is what ``onnxq inspect`` users will read.

    Returns:
        The number of initializers renamed.
    """
    slot_names = {0: "X", 1: "W", 2: "B"}  # for the weighted ops; other ops get ``in<slot>``
    weighted_ops = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    graph_inputs = {i.name for i in graph.input}
    existing = {t.name for t in graph.initializer}
    consumers: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for slot, inp in enumerate(node.input):
            consumers.setdefault(inp, (node, slot))
    mapping: dict[str, str] = {}
    for init in graph.initializer:
        if not init.name.startswith("onnx::") or init.name in graph_inputs or init.name not in consumers:
            continue
        node, slot = consumers[init.name]
        suffix = slot_names.get(slot) if node.op_type in weighted_ops else None
        new = f"{node.name}.{suffix or f'in{slot}'}"
        while new in existing or new in mapping.values():
            new += "_"
        mapping[init.name] = new
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in mapping:
                node.input[k] = mapping[inp]
    return len(mapping)


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_name: str = "logits",
    doc: str = "",
) -> onnx.ModelProto:
    """Export ``model`` with the TorchScript exporter and post-process the result.

    Post-processing: ``Constant`` nodes become initializers, anonymous
    initializers get readable names, every node gets a unique name, the IR
    version is pinned to :data:`IR_VERSION`, metadata is added, and the result
    must pass ``onnx.checker.check_model(full_check=True)``.

    Args:
        model: the eval-mode module (BatchNorm is folded into Conv by the exporter).
        example: an example input batch.
        path: where to write the ``.onnx`` file.
        input_name: graph input name.
        output_name: graph output name.
        doc: ``doc_string`` of the model.

    Returns:
        The post-processed model (also written to ``path``).
    """
    model.eval()
    tmp = path.with_suffix(".raw.onnx")
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        dynamo=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=True,
        export_params=True,
        keep_initializers_as_inputs=False,
        training=torch.onnx.TrainingMode.EVAL,
    )
    m = onnx.load(str(tmp))
    tmp.unlink()
    n_const = _constants_to_initializers(m.graph)
    _name_nodes(m.graph)
    n_ren = _rename_initializers(m.graph)
    m.ir_version = IR_VERSION
    m.producer_name = "onnxq-models"
    m.producer_version = torch.__version__
    m.doc_string = doc
    m.graph.name = path.stem
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    logger.info(
        "exported %s: %d nodes, %d initializers (%d from Constant nodes, %d renamed), %.1f kB",
        path.name, len(m.graph.node), len(m.graph.initializer), n_const, n_ren, path.stat().st_size / 1024,
    )
    return m


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type in the main graph, sorted by op type."""
    hist: dict[str, int] = {}
    for node in model.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items()))


def onnx_logits(path: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run the ONNX model at ``path`` in onnxruntime (CPU, default options) in one batch."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, dict(feeds))[0])


def verify_against_torch(
    model: torch.nn.Module, path: Path, input_name: str, x: np.ndarray, atol: float = 1e-4
) -> float:
    """Check that onnxruntime reproduces torch's logits on ``x`` to ``atol``.

    Returns:
        The maximum absolute difference.

    Raises:
        AssertionError: if the difference exceeds ``atol``.
    """
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = onnx_logits(path, {input_name: x})
    diff = float(np.max(np.abs(ref - got)))
    logger.info("torch vs onnxruntime max |diff| = %.3g", diff)
    if not diff <= atol:
        raise AssertionError(f"onnxruntime differs from torch by {diff} > {atol}")
    return diff


def write_artifacts(
    stem: str,
    model: torch.nn.Module,
    input_name: str,
    x_calib: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    train_seconds: float,
    extra: Mapping[str, object] | None = None,
    out_dir: Path = MODELS_DIR,
) -> dict[str, object]:
    """Write ``<stem>.calib.npz``, ``<stem>.eval.npz`` and ``<stem>.json`` next to the model in ``out_dir``.

    The fp32 accuracy is computed by running the exported ``<stem>.onnx`` in
    onnxruntime on the whole eval split in one batch (exactly what
    ``tests/test_models.py`` recomputes).

    Returns:
        The metadata written to ``<stem>.json``.
    """
    onnx_path = out_dir / f"{stem}.onnx"
    np.savez(out_dir / f"{stem}.calib.npz", **{input_name: x_calib})
    np.savez(out_dir / f"{stem}.eval.npz", **{input_name: x_eval, "labels": y_eval.astype(np.int64)})
    logits = onnx_logits(onnx_path, {input_name: x_eval})
    acc = float(np.mean(np.argmax(logits, axis=1) == y_eval))
    meta: dict[str, object] = {
        "model": stem,
        "task": "classification",
        "metric": "accuracy",
        "fp32_accuracy": acc,
        "input": input_name,
        "output": "logits",
        "params": count_params(model),
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "dataset": "sklearn.datasets.load_digits (1437 train / 360 eval, stratified, random_state=0)",
        "n_calib": int(len(x_calib)),
        "n_eval": int(len(x_eval)),
    }
    if extra:
        meta.update(extra)
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("%s: onnxruntime eval accuracy %.4f", stem, acc)
    return meta


def summary(meta: Mapping[str, object], ops: Mapping[str, int]) -> str:
    """One human-readable summary block for a script's final print."""
    lines = [f"{meta['model']}: params={meta['params']} fp32_accuracy={meta['fp32_accuracy']:.4f} "
             f"train_seconds={meta['train_seconds']} opset={meta['opset']} ir_version={meta['ir_version']}",
             "  ops: " + ", ".join(f"{k}x{v}" for k, v in ops.items())]
    return "\n".join(lines)


__all__: Sequence[str] = [
    "MODELS_DIR", "OPSET", "IR_VERSION", "DigitsSplit", "setup_logging", "seed_everything", "load_split",
    "calib_indices", "count_params", "train_classifier", "torch_accuracy", "export_onnx", "op_histogram",
    "onnx_logits", "verify_against_torch", "write_artifacts", "summary",
]
