"""On-disk cache of calibration ranges, keyed by everything the ranges depend on.

The key is the sha256 of the model bytes, of the feed arrays (names, dtypes, shapes, bytes),
of the method and its options and of each tensor's target precision and symmetry. An entry is
a small JSON file ``<cache_dir>/calib-<key>.json``, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxq.calibration.types import TensorRange
from onnxq.model import model_sha256

__all__ = ["ALGORITHM_VERSION", "CACHE_FORMAT", "cache_key", "feeds_digest", "load", "model_digest", "store"]

logger = logging.getLogger(__name__)

#: Format tag stored in every entry; bump it when the range algorithms change.
CACHE_FORMAT = "onnxq-calibration/2"
#: Bumped whenever a range algorithm's numbers change (part of every key).
ALGORITHM_VERSION = 1


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model (:func:`onnxq.model.model_sha256`: models over 2 GB are
    hashed part by part)."""
    return model_sha256(model)


def feeds_digest(feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
    """sha256 over every feed's arrays (in feed order, names sorted)."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            arr = np.ascontiguousarray(np.asarray(feed[name]))
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.reshape(-1).view(np.uint8))
        h.update(b"#")
    return h.hexdigest()


def cache_key(model_sha: str, feeds_sha: str, options: Mapping[str, object]) -> str:
    """The entry key: a sha256 of the digests and the (JSON-serialisable) options."""
    payload = json.dumps(
        {"format": CACHE_FORMAT, "algorithm": ALGORITHM_VERSION, "model": model_sha, "feeds": feeds_sha,
         "options": options},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir).expanduser() / f"calib-{key}.json"


def load(
    cache_dir: str | os.PathLike[str], key: str, tensors: Sequence[str]
) -> dict[str, TensorRange] | None:
    """The cached ranges of ``tensors`` under ``key``, or ``None`` (missing or unreadable)."""
    path = _path(cache_dir, key)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT:
            return None
        ranges = {t: TensorRange.from_json(data["ranges"][t]) for t in tensors}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable calibration cache entry %s (%s)", path, exc)
        return None
    logger.info("calibration ranges loaded from cache %s", path)
    return ranges


def store(
    cache_dir: str | os.PathLike[str],
    key: str,
    ranges: Mapping[str, TensorRange],
    options: Mapping[str, object],
) -> None:
    """Write an entry atomically; failures are logged, never raised (the cache is optional)."""
    path = _path(cache_dir, key)
    data = {
        "format": CACHE_FORMAT,
        "options": options,
        "ranges": {t: r.to_json() for t, r in ranges.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write calibration cache %s (%s)", path, exc)
        return
    logger.debug("calibration ranges cached in %s", path)
