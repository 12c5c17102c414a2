"""The real PP-OCRv4 text detector (DBNet) with rendered, labelled text pages for calibration and test.

Usage::

    python models/export_ppocr_det.py [--wheel PATH.whl] [--out models/.cache/ppocr_det]
                                      [--calib 12] [--test 40]

The PyPI wheel ``rapidocr-onnxruntime==1.4.4`` ships PaddleOCR's trained
``ch_PP-OCRv4_det_infer.onnx`` (4.7 MB; a PP-LCNetV3 backbone with HardSigmoid/hard-swish
blocks, an RSE-FPN neck with Resize, a DB head with two ConvTranspose; opset 12, weights as
``Constant`` nodes; input ``x`` float32 ``[N, 3, H, W]``, H and W multiples of 32; output the
text probability map ``sigmoid_0.tmp_0`` ``[N, 1, H, W]``). Without ``--wheel`` the script
fetches the wheel with ``pip download --no-deps``. It writes into ``--out`` (git-ignored):

* ``ppocr_det.onnx``: the model file exactly as shipped;
* ``ppocr_det.calib.npz``: ``x`` float32 ``[12, 3, 640, 640]``, 12 rendered pages preprocessed
  exactly as rapidocr's ``DetPreProcess`` does (BGR channel order as its ``LoadImage`` gives,
  ``(pixel / 255 - 0.5) / 0.5``, HWC → CHW); the sibling file ``onnxq quantize`` picks up;
* ``ppocr_det.test.npz``: the 40 labelled test pages (other seeds): ``images`` uint8 RGB
  ``[40, 640, 640, 3]``, ``boxes`` int32 ``[K, 4]`` (x0, y0, x1, y1 of every text line, from
  PIL's ``textbbox``) and ``box_page`` int32 ``[K]``; :func:`preprocess` turns images into ``x``;
* ``ppocr_det.json``: metadata, with the fp32 detection precision / recall / F1 on the test pages.

Pages: 640×640, a light background (random tint, a soft gradient, Gaussian noise, a few faint
rules), 5–14 non-overlapping horizontal text lines of 1–6 random English words, each in one of
the TrueType fonts found on the machine (PIL's bundled default font at the same size when there is
none), 14–44 px, near-black or dark-coloured. Every seed is fixed, so the files are a pure function
of the script, the fonts and Pillow.

The detection metric (:func:`detect` and :func:`match`) is PP-OCR's DB post-processing in a
simplified, axis-aligned form: threshold the probability map at 0.3, label 8-connected components
(``scipy.ndimage.label``), keep components whose mean probability is ≥ 0.5 and whose short side is
≥ 3 px, expand each bounding rectangle by ``area × 1.6 / perimeter`` (the DB unclip distance,
ratio 1.6 as rapidocr), then match detections to ground-truth lines one-to-one, greedily by IoU,
at IoU ≥ 0.5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy import ndimage

logger = logging.getLogger("export_ppocr_det")

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = MODELS_DIR / ".cache" / "ppocr_det"
PACKAGE = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
SIZE = 640
CALIB_SEED, TEST_SEED = 1000, 2000
THRESH, BOX_THRESH, UNCLIP, MIN_SIZE, MATCH_IOU = 0.3, 0.5, 1.6, 3, 0.5
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path("/Library/Fonts"), Path("C:/Windows/Fonts"))
FONT_PREFERENCE = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf",
                   "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf", "DejaVuSansMono.ttf")
WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount date order number customer address street city "
    "phone email account payment due balance receipt price quantity item description tax subtotal discount "
    "shipping delivery method reference page report summary annual quarter revenue growth market share model "
    "network layer weight scale offset signal image text line box detection page section chapter figure table "
    "north south east west river mountain garden station library museum office school hospital market harbour "
    "2024 2025 17 42 365 1000 99.95 12:30 No. A-17 ID#4821"
).split()


@dataclass(frozen=True)
class Page:
    """One rendered page: RGB pixels and the x0, y0, x1, y1 box of every text line."""

    image: np.ndarray
    boxes: np.ndarray


# -- the model -----------------------------------------------------------------------------------

def fetch_model(wheel: Path | None, out: Path) -> Path:
    """Copy the detector out of the rapidocr wheel (downloaded with pip when ``wheel`` is None)."""
    target = out / "ppocr_det.onnx"
    if wheel is None:
        found = sorted(out.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), PACKAGE],
                           check=True)
            found = sorted(out.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        wheel = found[0]
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(MEMBER))
    return target


# -- rendering -----------------------------------------------------------------------------------

def font_files() -> list[Path]:
    """The preferred TrueType fonts present on this machine, in a fixed order."""
    found: dict[str, Path] = {}
    for folder in FONT_DIRS:
        if folder.is_dir():
            for path in sorted(folder.rglob("*.ttf")):
                found.setdefault(path.name, path)
    return [found[name] for name in FONT_PREFERENCE if name in found]


def load_font(fonts: list[Path], index: int, size: int):  # noqa: ANN201 - a PIL font
    from PIL import ImageFont

    if not fonts:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(fonts[index % len(fonts)]), size)


def background(rng: np.random.Generator) -> np.ndarray:
    """A light tinted page with a soft gradient and sensor-like noise, float RGB."""
    tint = rng.uniform(215, 252, size=3)
    ramp = np.linspace(-1.0, 1.0, SIZE)[:, None, None] * rng.uniform(-10, 10)
    page = tint + ramp + rng.normal(0.0, rng.uniform(2.0, 7.0), size=(SIZE, SIZE, 3))
    return page


def text_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.7:
        return tuple(int(v) for v in rng.integers(0, 60, size=3))
    hue = rng.integers(0, 3)
    colour = rng.integers(0, 70, size=3)
    colour[hue] = rng.integers(110, 180)
    return tuple(int(v) for v in colour)


def overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], margin: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in boxes)


def render_page(rng: np.random.Generator, fonts: list[Path]) -> Page:
    """A page of horizontal text lines at random sizes and positions; boxes from PIL's textbbox."""
    from PIL import Image, ImageDraw

    pixels = background(rng)
    for _ in range(int(rng.integers(0, 3))):  # faint rules: structure that is not text
        y = int(rng.integers(0, SIZE))
        pixels[y:y + 1, :, :] -= rng.uniform(15, 30)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    wanted = int(rng.integers(5, 15))
    for _ in range(wanted * 20):
        if len(boxes) == wanted:
            break
        size = int(rng.integers(14, 45))
        font = load_font(fonts, int(rng.integers(0, 1 << 16)), size)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 7))))
        x, y = int(rng.integers(8, SIZE - 40)), int(rng.integers(8, SIZE - 40))
        box = tuple(int(v) for v in draw.textbbox((x, y), text, font=font))
        if box[2] > SIZE - 8 or box[3] > SIZE - 8 or overlaps(box, boxes, margin=size // 2 + 4):
            continue
        draw.text((x, y), text, font=font, fill=text_colour(rng))
        boxes.append(box)
    return Page(np.asarray(image, dtype=np.uint8), np.array(boxes, dtype=np.int32).reshape(-1, 4))


def render_pages(count: int, seed: int) -> list[Page]:
    fonts = font_files()
    return [render_page(np.random.default_rng([seed, i]), fonts) for i in range(count)]


def preprocess(images: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[N, H, W, 3]`` → the detector's ``x``: BGR, ``(v / 255 - 0.5) / 0.5``, NCHW float32."""
    bgr = images[..., ::-1].astype(np.float32)
    return np.ascontiguousarray(((bgr / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2), dtype=np.float32)


# -- the task metric -----------------------------------------------------------------------------

def detect(prob: np.ndarray) -> np.ndarray:
    """DB post-processing of one ``[H, W]`` probability map: x0, y0, x1, y1 boxes (float)."""
    labels, count = ndimage.label(prob > THRESH, structure=np.ones((3, 3), bool))
    if count == 0:
        return np.zeros((0, 4))
    scores = ndimage.mean(prob, labels, index=np.arange(1, count + 1))
    boxes = []
    for region, score in zip(ndimage.find_objects(labels), scores, strict=True):
        h, w = region[0].stop - region[0].start, region[1].stop - region[1].start
        if score < BOX_THRESH or min(h, w) < MIN_SIZE:
            continue
        d = h * w * UNCLIP / (2 * (h + w))
        boxes.append((region[1].start - d, region[0].start - d, region[1].stop + d, region[0].stop + d))
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` [n, 4] and ``b`` [m, 4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match(detected: np.ndarray, truth: np.ndarray) -> int:
    """Detections matched one-to-one to ground-truth boxes, greedily by IoU, at IoU ≥ 0.5."""
    if len(detected) == 0 or len(truth) == 0:
        return 0
    overlap = iou(detected, truth.astype(np.float64))
    hits = 0
    while overlap.size and overlap.max() >= MATCH_IOU:
        i, j = np.unravel_index(int(np.argmax(overlap)), overlap.shape)
        hits += 1
        overlap[i, :] = -1.0
        overlap[:, j] = -1.0
    return hits


def detection_scores(probs: np.ndarray, boxes: np.ndarray, box_page: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of text-line detection over pages of ``[N, 1, H, W]`` probability maps."""
    hits = found = 0
    for page, prob in enumerate(probs):
        detected = detect(prob[0])
        found += len(detected)
        hits += match(detected, boxes[box_page == page])
    precision = hits / max(found, 1)
    recall = hits / max(len(boxes), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1, "detections": found, "matched": hits}


def run_pages(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Probability maps of every page, one page per call (batch 1, as deployed)."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: preprocess(images[i:i + 1])})[0] for i in range(len(images))])


# -- main ----------------------------------------------------------------------------------------

def stack(pages: list[Page]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.stack([p.image for p in pages])
    boxes = np.concatenate([p.boxes for p in pages])
    box_page = np.concatenate([np.full(len(p.boxes), i, np.int32) for i, p in enumerate(pages)])
    return images, boxes, box_page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded rapidocr_onnxruntime 1.4.4 wheel (else pip downloads it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--calib", type=int, default=12, help="calibration pages")
    parser.add_argument("--test", type=int, default=40, help="labelled test pages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    model = fetch_model(args.wheel, args.out)
    calib_images, _, _ = stack(render_pages(args.calib, CALIB_SEED))
    np.savez(args.out / "ppocr_det.calib.npz", x=preprocess(calib_images))
    images, boxes, box_page = stack(render_pages(args.test, TEST_SEED))
    np.savez_compressed(args.out / "ppocr_det.test.npz", images=images, boxes=boxes, box_page=box_page)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores = detection_scores(run_pages(session, images), boxes, box_page)
    meta = {"source": f"PyPI {PACKAGE}: {MEMBER}", "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "onnx_bytes": model.stat().st_size, "input": "x float32 [N, 3, H, W] (BGR, (v/255-0.5)/0.5)",
            "page": SIZE, "calib_pages": args.calib, "test_pages": args.test, "test_lines": int(len(boxes)),
            "fonts": [p.name for p in font_files()] or ["PIL default"], "fp32": scores}
    (args.out / "ppocr_det.json").write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %s; fp32 detection on %d test lines: %s", args.out, len(boxes),
                {k: round(v, 4) for k, v in scores.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
