"""Model checkpoints: a directory (local or S3 prefix) with model.safetensors + model.json.

API:
    class CheckpointError(RuntimeError)     # message names the file and the problem
    @dataclass class ModelManifest:
        architecture: str; classes: list[str]; input_spec: InputSpec
        metrics: dict; training_config: dict; dataset_fingerprint: str | None
        created_at: str (ISO-8601 UTC); version: str (unique id, e.g. "20261121T213800Z-1a2b3c4d")
        format_version: int = 1
        to_dict()/from_dict()
    save_model(uri, model, manifest) -> str                 # returns uri; writes safetensors then json
    load_model(uri, device="cpu") -> tuple[nn.Module, ModelManifest]   # eval mode; never unpickles
    load_manifest(uri) -> ModelManifest
    resolve_model_uri(uri) -> str       # accepts a model dir or a pointer json (latest.json) -> model dir
    write_pointer(pointer_uri, model_uri, manifest) -> None    # atomic

Also: new_version_id(), utc_now_iso(), dataset_fingerprint(items), model_state_dict(model).

Layout and decisions:
- ``model.safetensors``: the model's state dict (DDP ``module.`` / torch.compile ``_orig_mod.``
  prefixes stripped, tensors contiguous on CPU). Loading uses ``safetensors.torch.load`` on the
  bytes: nothing is ever unpickled.
- ``model.json``: the :class:`ModelManifest`, plus ``weights_sha256`` (of model.safetensors, so a
  corrupt or half-copied file is detected) and ``num_parameters``. It is written *last*: a
  directory with model.json is a complete checkpoint. Re-saving into the same directory deletes
  the old model.json first.
- A pointer is a small JSON file (e.g. ``models/emonet/latest.json``)::

      {"model_uri": "...", "version": "...", "architecture": "...", "classes": [...],
       "published_at": "..."}

  ``model_uri`` may be absolute (path, file://, s3://) or relative to the pointer's directory.
  It is replaced in one atomic write (temp file + rename locally, a single PUT on S3), so readers
  see the old or the new model, never a mix. A directory holding ``latest.json`` but no
  ``model.json`` is followed through that pointer.
- Every failure to load is a :class:`CheckpointError` whose one-line message starts with the full
  URI of the file concerned and says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlparse

import torch
from torch import nn

from emotion_core import storage
from emotion_core.labels import CANONICAL
from emotion_core.models import (
    count_parameters,
    create_model,
    get_input_spec,
    list_models,
    state_dict_problem,
)
from emotion_core.preprocess import InputSpec

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
POINTER_FILE = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix, second precision."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version_id() -> str:
    """A sortable, unique version id: ``YYYYMMDDTHHMMSSZ-<8 hex>``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def dataset_fingerprint(items: Iterable[tuple]) -> str:
    """sha256 (hex) of a dataset listing, independent of listing order.

    ``items`` are tuples such as ``(relative_path, size_bytes)`` (an etag or mtime may be added);
    fields are joined with tabs, one line per item, lines sorted."""
    lines = sorted("\t".join(str(f) for f in item) for item in items)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class ModelManifest:
    """What model.json holds. ``weights_sha256`` and ``num_parameters`` are filled by
    :func:`save_model`; the other defaults let callers pass only what they know."""

    architecture: str
    classes: list[str]
    input_spec: InputSpec
    metrics: dict = field(default_factory=dict)
    training_config: dict = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    created_at: str = field(default_factory=utc_now_iso)
    version: str = field(default_factory=new_version_id)
    format_version: int = FORMAT_VERSION
    weights_sha256: str | None = None
    num_parameters: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["input_spec"] = self.input_spec.to_dict()
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelManifest:
        """Parse and validate; any problem -> ``ValueError`` saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        fv = d.get("format_version")
        if fv != FORMAT_VERSION:
            raise ValueError(
                f"format_version {fv!r} is not supported (this code reads {FORMAT_VERSION}); "
                "use the emotion-labelling version that wrote it or re-save the model"
            )
        required = ("architecture", "classes", "input_spec", "created_at", "version")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        try:
            spec = InputSpec.from_dict(d["input_spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid input_spec {d['input_spec']!r} ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["input_spec"] = spec
        manifest = cls(**kwargs)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check architecture, classes and input spec; ``ValueError`` on the first problem."""
        if self.architecture not in list_models():
            raise ValueError(
                f"unknown architecture {self.architecture!r}; registered: {', '.join(list_models())}"
            )
        classes = self.classes
        if not isinstance(classes, list) or not classes:
            raise ValueError("classes must be a non-empty list of emotion names")
        bad = [c for c in classes if c not in CANONICAL]
        if bad:
            raise ValueError(f"class {bad[0]!r} is not a canonical emotion name ({', '.join(CANONICAL)})")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes contain duplicates: {classes}")
        expected = get_input_spec(self.architecture)
        if (self.input_spec.size, self.input_spec.channels) != (expected.size, expected.channels):
            raise ValueError(
                f"input_spec {self.input_spec.size}x{self.input_spec.size}x{self.input_spec.channels} "
                f"does not match architecture {self.architecture!r} "
                f"({expected.size}x{expected.size}x{expected.channels})"
            )


# ---------------------------------------------------------------------------------------------
# Save


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: DDP/DataParallel and torch.compile wrappers removed,
    tensors detached, on CPU and contiguous."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v.detach().cpu().contiguous()
    return out


def save_model(uri: str, model: nn.Module, manifest: ModelManifest) -> str:
    """Write ``model.safetensors`` then ``model.json`` under ``uri`` and return ``uri``.

    Fills ``manifest.weights_sha256`` and ``manifest.num_parameters`` in place. Refuses
    (``ValueError``) a manifest that is invalid or whose architecture/classes do not fit the
    weights, so every saved checkpoint loads."""
    from safetensors.torch import save

    uri = str(uri).rstrip("/")
    manifest.validate()
    sd = model_state_dict(model)
    reference = create_model(manifest.architecture, manifest.num_classes)
    problem = state_dict_problem(reference, sd)
    if problem:
        raise ValueError(
            f"refusing to save {uri}: the weights do not fit architecture {manifest.architecture!r} "
            f"with {manifest.num_classes} classes: {problem}"
        )
    blob = save(sd, metadata={"format": "pt", "architecture": manifest.architecture})
    manifest.weights_sha256 = hashlib.sha256(blob).hexdigest()
    manifest.num_parameters = count_parameters(reference)
    text = json.dumps(manifest.to_dict(), indent=2, default=_json_default) + "\n"

    json_uri = storage.join(uri, MANIFEST_FILE)
    try:
        if storage.exists(json_uri):  # keep "model.json present => complete" true while rewriting
            fs, path = storage.filesystem(json_uri)
            fs.delete_file(path)
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), blob)
        storage.write_bytes(json_uri, text.encode("utf-8"))
    except (storage.StorageError, OSError) as e:
        raise CheckpointError(f"cannot write checkpoint {uri}: {e}") from e
    return uri


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------
# Load


def load_model(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelManifest]:
    """Load a checkpoint (model directory or pointer .json) into its registered architecture.
    Returns ``(model in eval mode on device, manifest)``."""
    from safetensors.torch import load

    model_uri = resolve_model_uri(uri)
    manifest = _read_manifest(model_uri)
    weights_uri = storage.join(model_uri, WEIGHTS_FILE)
    try:
        blob = storage.read_bytes(weights_uri)
    except storage.StorageError as e:
        raise CheckpointError(
            f"{weights_uri}: missing or unreadable ({e}); the checkpoint is incomplete, re-save it"
        ) from e
    if manifest.weights_sha256:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != manifest.weights_sha256:
            raise CheckpointError(
                f"{weights_uri}: corrupt (sha256 {actual[:12]}... but model.json records "
                f"{manifest.weights_sha256[:12]}...); re-copy or re-save the checkpoint"
            )
    try:
        sd = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights_uri}: corrupt, not a readable safetensors file ({e})") from e
    model = create_model(manifest.architecture, manifest.num_classes)
    problem = state_dict_problem(model, sd)
    if problem:
        raise CheckpointError(
            f"{weights_uri}: does not match {storage.join(model_uri, MANIFEST_FILE)} (architecture "
            f"{manifest.architecture!r}, {manifest.num_classes} classes): {problem}"
        )
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), manifest


def load_manifest(uri: str) -> ModelManifest:
    """The manifest of a checkpoint (model directory or pointer .json)."""
    return _read_manifest(resolve_model_uri(uri))


def _read_manifest(model_uri: str) -> ModelManifest:
    json_uri = storage.join(model_uri, MANIFEST_FILE)
    d = _read_json(json_uri, "model manifest")
    try:
        return ModelManifest.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{json_uri}: invalid model manifest: {e}") from e


def _read_json(uri: str, what: str) -> dict:
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise CheckpointError(f"{uri}: {what} not found or unreadable ({e})") from e
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: {what} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{uri}: {what} must be a JSON object, got {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------------------------
# Pointers


def resolve_model_uri(uri: str) -> str:
    """Model directory for ``uri``: a pointer .json is followed, a model.json gives its
    directory, a directory with model.json is returned as is, and a directory with only a
    latest.json is followed through it."""
    uri = str(uri).strip().rstrip("/")
    if uri.endswith(".json"):
        d = _read_json(uri, "model pointer")
        if "model_uri" in d:
            target = _resolve_relative(uri, str(d["model_uri"]))
            if not _exists(storage.join(target, MANIFEST_FILE)):
                raise CheckpointError(
                    f"{uri}: points to {target}, which holds no {MANIFEST_FILE} "
                    "(deleted or incomplete checkpoint); publish the pointer again"
                )
            return target
        if "architecture" in d:  # a model.json itself
            return uri.rsplit("/", 1)[0] if "/" in uri else "."
        raise CheckpointError(f"{uri}: neither a model pointer (no 'model_uri') nor a {MANIFEST_FILE}")
    if _exists(storage.join(uri, MANIFEST_FILE)):
        return uri
    if _exists(storage.join(uri, POINTER_FILE)):
        return resolve_model_uri(storage.join(uri, POINTER_FILE))
    if not _exists(uri):
        raise CheckpointError(
            f"{uri}: no checkpoint there (not found); pass a model directory or a pointer .json"
        )
    raise CheckpointError(
        f"{storage.join(uri, MANIFEST_FILE)}: missing (incomplete checkpoint: model.json is written "
        "last); re-save the model or point at another version"
    )


def write_pointer(pointer_uri: str, model_uri: str, manifest: ModelManifest) -> None:
    """Atomically publish ``model_uri`` (absolute, or relative to the pointer's directory) at
    ``pointer_uri`` (a .json path). Refuses to point at a directory without model.json."""
    pointer_uri = str(pointer_uri).strip()
    if not pointer_uri.endswith(".json"):
        raise ValueError(f"pointer {pointer_uri!r} must be a .json file, e.g. .../latest.json")
    model_uri = str(model_uri).strip().rstrip("/")
    target = _resolve_relative(pointer_uri, model_uri)
    if not _exists(storage.join(target, MANIFEST_FILE)):
        raise CheckpointError(
            f"{storage.join(target, MANIFEST_FILE)}: missing; save the model before publishing "
            f"a pointer to it at {pointer_uri}"
        )
    payload = {
        "model_uri": model_uri,
        "version": manifest.version,
        "architecture": manifest.architecture,
        "classes": list(manifest.classes),
        "published_at": utc_now_iso(),
    }
    try:
        storage.write_bytes(pointer_uri, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    except storage.StorageError as e:
        raise CheckpointError(f"cannot publish pointer: {e}") from e


def _resolve_relative(pointer_uri: str, model_uri: str) -> str:
    if urlparse(model_uri).scheme in ("s3", "s3a", "file") or os.path.isabs(model_uri):
        return model_uri.rstrip("/")
    loc = storage.parse(pointer_uri)
    if loc.is_s3:
        return "s3://" + posixpath.normpath(posixpath.join(posixpath.dirname(loc.path), model_uri))
    return os.path.normpath(os.path.join(os.path.dirname(loc.path), model_uri))


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except (storage.StorageError, OSError) as e:
        raise CheckpointError(f"{uri}: cannot check whether it exists ({e})") from e
