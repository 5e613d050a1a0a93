"""The Ray Data stages of ``jobs.label``: read + decode, and inference in an actor pool.

Data flow: a dataset of *object references* (listing rows, a few hundred to a few thousand per
block) goes through

* :func:`fetch_decode` (read the block's objects concurrently, decode with
  :func:`emotion_core.preprocess.decode_batch`) -> small uint8 pixel arrays, and
* :class:`Labeller`, an actor holding the model (loaded once per actor) -> result rows.

Image bytes never cross a process boundary; only listing rows, 48x48 pixel arrays and result
rows do. On CPU the two stages are *fused* into the actor (``fuse=True``): on a small node Ray's
own processes already compete for the cores, and an extra hop per block costs more than it
buys; on GPU they stay separate so CPU tasks decode while the GPU actor infers.

Inference on CPU runs a ``torch.jit.trace`` + ``optimize_for_inference`` (oneDNN) version of the
model with one thread per actor CPU; it is several times faster than eager for these small
CNNs and is checked against the eager model on load (any mismatch or trace failure falls back
to eager). On GPU: channels_last + fp16 autocast.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from emotion_core.preprocess import InputSpec, decode_batch, normalize
from emotion_core.schema import TIMESTAMP, prob_column

from . import _label_io

# Test-only fault injection: a directory; the first actor to get its second block kills its own
# process (os._exit) once per directory, so Ray must restart it and retry the lost tasks.
FAIL_ONCE_ENV = "EMOTION_LABEL_FAIL_ONCE"


def pixels_to_column(pixels: np.ndarray) -> pa.Array:
    """(N, C, H, W) uint8 -> fixed-size binary column, zero copy."""
    n = pixels.shape[0]
    width = int(np.prod(pixels.shape[1:]))
    buf = pa.py_buffer(np.ascontiguousarray(pixels))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buf])


def column_to_pixels(col, spec: InputSpec) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n, width = len(arr), arr.type.byte_width
    flat = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + n) * width)
    return flat[arr.offset * width :].reshape(n, spec.channels, spec.size, spec.size)


def fetch_decode(batch: pa.Table, spec: InputSpec, threads: int = 32) -> pa.Table:
    """Listing rows -> the same rows (metadata as read) + width, height, error, pixels."""
    uris = batch["image_uri"].to_pylist()
    datas, read_errors, metas = _label_io.fetch(uris, threads)
    pixels, widths, heights, errors = decode_batch(datas, spec)
    errors = [r or e for r, e in zip(read_errors, errors)]
    widths = [None if r else w for r, w in zip(read_errors, widths)]
    heights = [None if r else h for r, h in zip(read_errors, heights)]
    etag, size, mtime = batch["etag"].to_pylist(), batch["size_bytes"].to_pylist(), batch["last_modified"]
    mtime = mtime.cast(pa.int64()).to_pylist()
    for i, m in enumerate(metas):
        if m is not None:
            etag[i], size[i], mtime[i] = m
    return pa.table(
        {
            "image_uri": batch["image_uri"],
            "etag": pa.array(etag, pa.string()),
            "size_bytes": pa.array(size, pa.int64()),
            "last_modified": pa.array(mtime, pa.int64()).cast(TIMESTAMP),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "error": pa.array(errors, pa.string()),
            "pixels": pixels_to_column(pixels),
        }
    )


def fast_forward(model: torch.nn.Module, spec: InputSpec, device: torch.device, jit: bool = True):
    """A callable float32 (N, C, H, W) -> logits, as fast as this device allows (see module doc)."""
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

        def forward(x):
            with torch.autocast("cuda", dtype=torch.float16):
                return model(x.contiguous(memory_format=torch.channels_last)).float()

        return forward
    if not jit:
        return model
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, spec.channels, spec.size, spec.size, generator=gen)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.optimize_for_inference(torch.jit.trace(model, probe[:2]))
            ok = torch.allclose(traced(probe), model(probe), rtol=1e-3, atol=1e-4)
    except Exception:  # any model the tracer cannot handle runs eager
        return model
    return traced if ok else model


def _maybe_fail_once(marker_dir: str | None) -> None:
    """Kill this process unless another one already did so for ``marker_dir`` (test only)."""
    if not marker_dir:
        return
    try:
        fd = os.open(os.path.join(marker_dir, "crashed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


class Labeller:
    """Ray Data actor: loads the model once, labels blocks (fetching + decoding them itself when
    ``fuse``). Returns result rows: listing columns, label, confidence, probabilities, width,
    height, error, labelled_at (the driver adds model_name/model_version/run_id)."""

    def __init__(
        self,
        model_uri: str,
        expected_version: str,
        device: str = "cpu",
        threads: int = 1,
        fuse: bool = True,
        fetch_threads: int = 32,
        infer_batch: int = 256,
        jit: bool = True,
        fail_once: str | None = None,
    ):
        from emotion_core.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        model, manifest = load_model(model_uri, device=self.device)
        if manifest.version != expected_version:
            raise RuntimeError(
                f"{model_uri} changed during the run: version {manifest.version}, expected {expected_version}"
            )
        self.classes = list(manifest.classes)
        self.spec = manifest.input_spec
        self.forward = fast_forward(model, self.spec, self.device, jit)
        self.fuse, self.fetch_threads, self.infer_batch = fuse, fetch_threads, infer_batch
        self.fail_once, self.calls = fail_once, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls > 1:  # mid-run: after this actor already returned a block
            _maybe_fail_once(self.fail_once)
        if self.fuse:
            batch = fetch_decode(batch, self.spec, self.fetch_threads)
        pixels = column_to_pixels(batch["pixels"], self.spec)
        ok = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        probs = np.zeros((batch.num_rows, len(self.classes)), dtype=np.float32)
        idx = np.flatnonzero(ok)
        with torch.inference_mode():
            for start in range(0, len(idx), self.infer_batch):
                rows = idx[start : start + self.infer_batch]
                x = torch.from_numpy(pixels[rows]).to(self.device, non_blocking=True)
                logits = self.forward(normalize(x, self.spec))
                probs[rows] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return result_table(batch, probs, ok, self.classes)


def result_table(batch: pa.Table, probs: np.ndarray, ok: np.ndarray, classes: list[str]) -> pa.Table:
    """Decoded rows + probabilities -> result columns (label/confidence/probs null on error)."""
    n = batch.num_rows
    best = probs.argmax(axis=1).astype(np.int32) if n else np.zeros(0, np.int32)
    bad = ~ok
    label = pa.DictionaryArray.from_arrays(pa.array(best, mask=bad), pa.array(classes)).cast(pa.string())
    conf = probs[np.arange(n), best] if n else np.zeros(0, np.float32)
    cols = {c: batch[c] for c in ("image_uri", "etag", "size_bytes", "last_modified")}
    cols["label"] = label
    cols["confidence"] = pa.array(conf, pa.float32(), mask=bad)
    for j, c in enumerate(classes):
        cols[prob_column(c)] = pa.array(probs[:, j], pa.float32(), mask=bad)
    cols.update({c: batch[c] for c in ("width", "height", "error")})
    cols["labelled_at"] = pa.array(np.full(n, int(time.time() * 1000), dtype=np.int64)).cast(TIMESTAMP)
    return pa.table(cols)


def empty_result(classes: list[str]) -> pa.Table:
    decoded = fetch_decode(_label_io.LISTING_SCHEMA.empty_table(), InputSpec())
    return result_table(decoded, np.zeros((0, len(classes)), np.float32), np.zeros(0, bool), classes)
