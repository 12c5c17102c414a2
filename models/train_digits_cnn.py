"""Train and export ``digits_cnn``: a small depthwise-separable residual CNN on sklearn digits.

Run ``python models/train_digits_cnn.py`` to regenerate, deterministically:

- ``models/digits_cnn.onnx``       (opset 17, IR 8, BatchNorm folded into Conv)
- ``models/digits_cnn.calib.npz``  (256 unlabeled train-split samples, key ``input``)
- ``models/digits_cnn.eval.npz``   (360 labeled eval samples, keys ``input`` and ``labels``)
- ``models/digits_cnn.json``       (metadata, including the onnxruntime fp32 accuracy)

Preprocessing (done here, not in the graph): pixel intensities ``0..16`` are
divided by 16 and the 8x8 image is upsampled to 16x16 with bilinear
interpolation (``align_corners=False``).  The ONNX input is ``input``
float32 ``[N, 1, 16, 16]``; the output is ``logits`` float32 ``[N, 10]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

logger = logging.getLogger("train_digits_cnn")

STEM = "digits_cnn"
INPUT_NAME = "input"
SEED = 0
IMAGE_SIZE = 16


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """Map raw digits rows (int ``0..16``, ``[N, 64]``) to CNN inputs float32 ``[N, 1, 16, 16]``."""
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + optional ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class SeparableBlock(nn.Module):
    """Depthwise 3x3 (group = channels) + pointwise 1x1, with a residual Add when shapes allow.

    ``y = relu(x + bn(pw(relu(bn(dw(x))))))`` for the residual form, and
    ``y = relu(bn(pw(relu(bn(dw(x))))))`` when the block changes stride or width.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = ConvBNReLU(cin, cin, 3, stride=stride, groups=cin)
        self.pw = ConvBNReLU(cin, cout, 1, relu=False)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw(self.dw(x))
        if self.residual:
            y = y + x
        return self.act(y)


class DigitsCNN(nn.Module):
    """Stem conv, three stages of separable blocks (16x16 → 8x8 → 4x4), GAP and a 2-layer head."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, widths[0], 3)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                blocks.append(SeparableBlock(cin, w, stride=2))
            blocks.extend(SeparableBlock(w, w) for _ in range(blocks_per_stage))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(cin, 128)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.drop(self.act(self.fc1(x))))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def main(argv: list[str] | None = None) -> None:
    """Train, export, verify and write all ``digits_cnn`` artifacts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=C.MODELS_DIR, help="where to write the artifacts")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.setup_logging()
    C.seed_everything(SEED)
    split = C.load_split()
    x_tr, x_ev = preprocess(split.x_train), preprocess(split.x_eval)
    y_tr, y_ev = split.y_train, split.y_eval

    model = DigitsCNN()
    logger.info("DigitsCNN: %d parameters", C.count_params(model))
    seconds = C.train_classifier(
        model,
        torch.from_numpy(x_tr), torch.from_numpy(y_tr),
        torch.from_numpy(x_ev), torch.from_numpy(y_ev),
        epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-4, label_smoothing=0.05,
        augment=random_shift, seed=SEED,
    )

    path = args.out_dir / f"{STEM}.onnx"
    onnx_model = C.export_onnx(
        model, torch.from_numpy(x_ev[:2]), path, INPUT_NAME,
        doc="digits_cnn: depthwise-separable residual CNN on sklearn load_digits (input 1x16x16, x/16, bilinear).",
    )
    C.verify_against_torch(model, path, INPUT_NAME, x_ev)
    x_calib = x_tr[C.calib_indices(len(x_tr))]
    meta = C.write_artifacts(
        STEM, model, INPUT_NAME, x_calib, x_ev, y_ev, seconds, out_dir=args.out_dir,
        extra={"preprocessing": "pixels/16, bilinear upsample 8x8->16x16 (align_corners=False)",
               "torch_eval_accuracy": C.torch_accuracy(model, torch.from_numpy(x_ev), torch.from_numpy(y_ev))},
    )
    print(C.summary(meta, C.op_histogram(onnx_model)))


if __name__ == "__main__":
    main()
