"""Train and export ``digits_resnet``: a ResNet-style CNN with plain 3x3 convs on sklearn digits.

This is the bundled model on which int8 actually pays off in onnxruntime: its
convolutions are large (dense 3x3 convs, 32..128 channels at 32x32..8x8, no depthwise), so the
per-kernel fixed costs that make int8 slower than fp32 on ``digits_cnn`` are
amortised (see ``models/README.md``, section "digits_resnet").

Run ``python models/train_digits_resnet.py`` to regenerate, deterministically:

- ``models/digits_resnet.onnx``       (opset 17, IR 8, BatchNorm folded into Conv)
- ``models/digits_resnet.calib.npz``  (256 unlabeled train-split samples, key ``input``)
- ``models/digits_resnet.eval.npz``   (360 labeled eval samples, keys ``input`` and ``labels``)
- ``models/digits_resnet.json``       (metadata, including the onnxruntime fp32 accuracy and MACs)

Preprocessing (done here, not in the graph): pixel intensities ``0..16`` are
divided by 16 and the 8x8 image is upsampled to 32x32 with bilinear
interpolation (``align_corners=False``).  The ONNX input is ``input``
float32 ``[N, 1, 32, 32]``; the output is ``logits`` float32 ``[N, 10]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

logger = logging.getLogger("train_digits_resnet")

STEM = "digits_resnet"
INPUT_NAME = "input"
SEED = 0
IMAGE_SIZE = 32

#: Stem output channels (3x3 conv at 32x32).
STEM_WIDTH = 32
#: Stages as ``(width, blocks, stride of the first block)``.
STAGES: tuple[tuple[int, int, int], ...] = ((32, 2, 1), (64, 2, 2), (128, 2, 2))
EPOCHS = 6
BATCH_SIZE = 64
LR = 3e-3


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """Map raw digits rows (int ``0..16``, ``[N, 64]``) to CNN inputs float32 ``[N, 1, 32, 32]``."""
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, optionally followed by ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(shortcut(x) + bn(conv3x3(relu(bn(conv3x3(x))))))``.

    The shortcut is the identity when the block keeps its shape, otherwise a
    strided 1x1 Conv + BN (ResNet "option B").
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride=stride)
        self.conv2 = ConvBN(cout, cout, 3, relu=False)
        self.shortcut = ConvBN(cin, cout, 1, stride=stride, relu=False) if (stride != 1 or cin != cout) else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.conv1(x)) + identity)


class DigitsResNet(nn.Module):
    """3x3 stem, stages of basic blocks, global average pool, linear head."""

    def __init__(self, stem_width: int = STEM_WIDTH,
                 stages: tuple[tuple[int, int, int], ...] = STAGES) -> None:
        super().__init__()
        self.stem = ConvBN(1, stem_width, 3)
        blocks: list[nn.Module] = []
        cin = stem_width
        for width, n_blocks, stride in stages:
            for b in range(n_blocks):
                blocks.append(BasicBlock(cin, width, stride if b == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def onnx_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per sample of the Conv and Gemm/MatMul nodes of ``model``.

    Uses onnx shape inference with the batch fixed to 1.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    dim0.Clear()
    dim0.dim_value = 1
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    inits = {t.name: numpy_helper.to_array(t).shape for t in m.graph.initializer}
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w = inits[node.input[1]]  # [Cout, Cin/group, kh, kw]
            out = shapes[node.output[0]]  # [1, Cout, H, W]
            total += int(np.prod(w)) * out[2] * out[3]
        elif node.op_type in ("Gemm", "MatMul"):
            total += int(np.prod(inits[node.input[1]]))
    return total


def main(argv: list[str] | None = None) -> None:
    """Train, export, verify and write all ``digits_resnet`` artifacts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=C.MODELS_DIR, help="where to write the artifacts")
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.setup_logging()
    C.seed_everything(SEED)
    split = C.load_split()
    x_tr, x_ev = preprocess(split.x_train), preprocess(split.x_eval)
    y_tr, y_ev = split.y_train, split.y_eval

    model = DigitsResNet()
    logger.info("DigitsResNet: %d parameters", C.count_params(model))
    seconds = C.train_classifier(
        model,
        torch.from_numpy(x_tr), torch.from_numpy(y_tr),
        torch.from_numpy(x_ev), torch.from_numpy(y_ev),
        epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR, weight_decay=5e-4, label_smoothing=0.05,
        augment=random_shift, seed=SEED, log_every=2,
    )

    path = args.out_dir / f"{STEM}.onnx"
    onnx_model = C.export_onnx(
        model, torch.from_numpy(x_ev[:2]), path, INPUT_NAME,
        doc="digits_resnet: ResNet-style CNN (dense 3x3 convs, residual Adds) on sklearn load_digits "
            "(input 1x32x32, x/16, bilinear).",
    )
    C.verify_against_torch(model, path, INPUT_NAME, x_ev, atol=1e-3)
    x_calib = x_tr[C.calib_indices(len(x_tr))]
    macs = onnx_macs(onnx_model)
    meta = C.write_artifacts(
        STEM, model, INPUT_NAME, x_calib, x_ev, y_ev, seconds, out_dir=args.out_dir,
        extra={"preprocessing": "pixels/16, bilinear upsample 8x8->32x32 (align_corners=False)",
               "macs_per_sample": macs,
               "architecture": {"stem_width": STEM_WIDTH, "stages": [list(s) for s in STAGES],
                                "block": "basic (2x conv3x3+BN, ReLU), 1x1 conv shortcut when shape changes"},
               "epochs": args.epochs,
               "torch_eval_accuracy": C.torch_accuracy(model, torch.from_numpy(x_ev), torch.from_numpy(y_ev))},
    )
    print(C.summary(meta, C.op_histogram(onnx_model)))
    print(f"  MACs/sample: {macs / 1e6:.1f} M, size: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
