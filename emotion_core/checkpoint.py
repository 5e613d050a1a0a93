"""Model checkpoints: immutable model versions (model.safetensors + model.json), pointers that
name a version and its weights hash, and strict validation of everything read back.

Layout::

    MODELS_ROOT/<version>/model.safetensors   the state dict (never pickled)
    MODELS_ROOT/<version>/model.json          the ModelManifest, written last
    .../latest.json                           a pointer: {"model_uri", "version", "sha256", ...}

Decisions:
- ``model.safetensors`` holds the model's state dict (DDP ``module.`` / torch.compile
  ``_orig_mod.`` prefixes stripped, tensors contiguous on CPU); loading uses
  ``safetensors.torch.load`` on the bytes, so nothing is ever unpickled.
- ``model.json`` holds the :class:`ModelManifest` plus ``weights_sha256`` (of model.safetensors)
  and ``num_parameters``. It is written *last* and deleted *first*: a directory is a complete
  model exactly when it holds model.json. Every field is validated on load; a bad one is a
  one-line :class:`CheckpointError` naming the file, the field and the value. Fields this code
  does not know are ignored (``format_version`` marks incompatible changes).
- :func:`export_model` writes a *new* version directory ``MODELS_ROOT/<version>/`` and never
  touches an existing complete one, then prunes versions beyond ``keep`` (newest by
  ``created_at``), except the new one and those named in ``protect`` (the published one). A
  directory without model.json (an export that died half way) is never listed, published or
  loaded; :func:`export_model` deletes such leftovers once they are an hour older, by the
  storage's own timestamps, than the newest file under the root. :func:`save_model` still
  writes a single model directory in place (tests, benchmarks, ad-hoc exports).
- A pointer is a small JSON file replaced in one atomic write (temp file + rename locally, a
  single PUT on S3), so readers see the old or the new model, never a mix. ``model_uri`` is
  absolute (path, file://, s3://) or relative to the pointer's directory. Loading through a
  pointer checks that the model's ``model.json`` has the pointer's ``version`` and
  ``weights_sha256`` equal to the pointer's ``sha256``, and that the weights bytes hash to that
  value: a model replaced in place after publishing is refused. A pointer written before
  ``sha256`` existed is checked by ``version`` only (the weights are still checked against
  model.json). A directory holding ``latest.json`` but no ``model.json`` is followed through it.
- Every failure to load is a :class:`CheckpointError` whose one-line message starts with the full
  URI of the file concerned and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import posixpath
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import pyarrow.fs as pafs
import torch
from torch import nn

from emotion_core import storage
from emotion_core.labels import CANONICAL
from emotion_core.models import (
    count_parameters,
    create_model,
    list_models,
    state_dict_problem,
)
from emotion_core.preprocess import InputSpec

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
POINTER_FILE = "latest.json"
STALE_INCOMPLETE = timedelta(hours=1)  # an incomplete version dir this much older than the newest file is debris

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # also a directory name and a Parquet value
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
SIZE_RANGE = (8, 1024)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or written; the message names the file and the problem."""


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
    model_kwargs: dict = field(default_factory=dict)  # architecture options (e.g. emonet widths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def create_model(self) -> nn.Module:
        """The untrained architecture this manifest describes: its class count, input size and
        channels, and model options."""
        return create_model(self.architecture, self.num_classes, img_size=self.input_spec.size,
                            in_chans=self.input_spec.channels, **self.model_kwargs)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["input_spec"] = self.input_spec.to_dict()
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelManifest:
        """Parse a saved manifest, validating every field; ``ValueError`` naming the first bad one."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        check_manifest_fields(d, saved=True)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["input_spec"] = InputSpec.from_dict(d["input_spec"])
        return cls(**kwargs)

    def validate(self) -> None:
        """Check the fields known before saving (all but the weights hash and parameter count)."""
        check_manifest_fields(self.to_dict(), saved=False)


def _bad(name: str, value, problem: str) -> ValueError:
    text = repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    return ValueError(f"field {name} = {text}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_manifest_fields(d: dict, saved: bool) -> None:
    """Validate a manifest dict field by field; ``ValueError("field NAME = VALUE: problem")`` on the
    first bad one. ``saved``: also require ``weights_sha256`` and ``num_parameters`` (set on save)."""
    required = ["format_version", "architecture", "classes", "input_spec", "created_at", "version"]
    required += ["weights_sha256", "num_parameters"] if saved else []
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    fv = d["format_version"]
    if fv != FORMAT_VERSION or not _is_int(fv):
        raise _bad("format_version", fv, f"not supported (this code reads {FORMAT_VERSION}); "
                   "use the emotion-labelling version that wrote it or re-save the model")
    arch = d["architecture"]
    if not isinstance(arch, str) or arch not in list_models():
        raise _bad("architecture", arch, f"unknown architecture; registered: {', '.join(list_models())}")
    classes = d["classes"]
    if not isinstance(classes, list) or not classes:
        raise _bad("classes", classes, "must be a non-empty list of emotion names")
    for c in classes:
        if not isinstance(c, str) or not c:
            raise _bad("classes", classes, f"{c!r} is not a non-empty string")
        if c not in CANONICAL:
            raise _bad("classes", classes, f"{c!r} is not a canonical emotion name ({', '.join(CANONICAL)})")
    if len(set(classes)) != len(classes):
        raise _bad("classes", classes, "contains duplicates")
    _check_input_spec(d["input_spec"])
    for name in ("metrics", "training_config", "model_kwargs"):
        if not isinstance(d.get(name, {}), dict):
            raise _bad(name, d[name], "must be a JSON object")
    fp = d.get("dataset_fingerprint")
    if fp is not None and not (isinstance(fp, str) and _SHA256_RE.fullmatch(fp)):
        raise _bad("dataset_fingerprint", fp, "must be null or 64 lowercase hex digits")
    created = d["created_at"]
    if not isinstance(created, str) or not _CREATED_RE.fullmatch(created):
        raise _bad("created_at", created, "must be an ISO-8601 UTC time like 2026-01-31T12:00:00Z")
    try:
        datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise _bad("created_at", created, "is not a valid date and time") from None
    version = d["version"]
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise _bad("version", version, "must be a non-empty string of letters, digits and ._- "
                   "(at most 128, not starting with a symbol)")
    sha = d.get("weights_sha256")
    if (saved or sha is not None) and not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        raise _bad("weights_sha256", sha, "must be the sha256 of model.safetensors, 64 lowercase hex digits")
    n = d.get("num_parameters")
    if (saved or n is not None) and not (_is_int(n) and n > 0):
        raise _bad("num_parameters", n, "must be a positive integer")


def _check_input_spec(spec) -> None:
    if not isinstance(spec, dict):
        raise _bad("input_spec", spec, "must be a JSON object with size, channels, mean, std")
    missing = [k for k in ("size", "channels", "mean", "std") if k not in spec]
    if missing:
        raise _bad("input_spec", spec, f"missing {', '.join(missing)}")
    size, channels = spec["size"], spec["channels"]
    if not _is_int(size) or not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise _bad("input_spec.size", size, f"must be an integer in {SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
    if not _is_int(channels) or channels not in (1, 3):
        raise _bad("input_spec.channels", channels, "must be 1 or 3")
    for name in ("mean", "std"):
        values = spec[name]
        if not isinstance(values, list) or len(values) != channels or not all(_is_number(v) for v in values):
            raise _bad(f"input_spec.{name}", values, f"must be a list of {channels} finite number(s)")
    if not all(v > 0 for v in spec["std"]):
        raise _bad("input_spec.std", spec["std"], "must be > 0")


# ---------------------------------------------------------------------------------------------
# Save and export


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


def _architecture_for(manifest: ModelManifest, sd: dict, error) -> nn.Module:
    """The manifest's untrained architecture, after checking ``sd`` fits it exactly (else raise
    ``error(problem)``): a save never writes, and a load never accepts, weights that do not fit."""
    model = manifest.create_model()
    problem = state_dict_problem(model, sd)
    if problem:
        raise error(problem)
    return model


def save_model(uri: str, model: nn.Module, manifest: ModelManifest) -> str:
    """Write ``model.safetensors`` then ``model.json`` under ``uri`` and return ``uri``; an existing
    model.json there is deleted first. Production exports use :func:`export_model` instead.

    Fills ``manifest.weights_sha256`` and ``manifest.num_parameters`` in place. Refuses
    (``ValueError``) a manifest that is invalid or whose architecture/classes do not fit the
    weights, so every saved checkpoint loads."""
    from safetensors.torch import save

    uri = str(uri).rstrip("/")
    try:
        manifest.validate()
    except ValueError as e:
        raise ValueError(f"refusing to save {uri}: invalid manifest: {e}") from None
    sd = model_state_dict(model)
    reference = _architecture_for(manifest, sd, lambda problem: ValueError(
        f"refusing to save {uri}: the weights do not fit architecture {manifest.architecture!r} "
        f"with {manifest.num_classes} classes: {problem}"))
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


def export_model(
    models_root: str, model: nn.Module, manifest: ModelManifest, keep: int = 5, protect: Iterable[str] = ()
) -> str:
    """Write ``model`` as the new version ``models_root/<manifest.version>/`` and return its URI
    (absolute: a local path is made absolute).

    Refuses (:class:`CheckpointError`) a version that already exists complete: versions are
    immutable. Weights are written before model.json, so nothing can list, publish or load the
    version before it is whole. Then keeps the ``keep`` newest complete versions plus the new one
    and every version id in ``protect`` (pass the published one), and deletes the rest (model.json
    first) and stale debris of interrupted exports."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = storage.parse(models_root).uri  # absolute, so a pointer can name the result as is
    try:
        manifest.validate()  # the version is about to become a directory name
    except ValueError as e:
        raise ValueError(f"refusing to export to {root}: invalid manifest: {e}") from None
    protect = {protect} if isinstance(protect, str) else set(protect)
    uri = storage.join(root, manifest.version)
    if _exists(storage.join(uri, MANIFEST_FILE)):
        raise CheckpointError(
            f"{uri}: version {manifest.version} already exists and versions are immutable; "
            "export with a new version id"
        )
    if _exists(uri):  # debris of an interrupted export of this very version: nothing can name it
        _delete_version(uri)
    save_model(uri, model, manifest)
    _prune(root, keep, protect | {manifest.version})
    return uri


@dataclass(frozen=True)
class ModelVersion:
    """A complete version directory (one holding model.json) under a models root."""

    version: str  # the directory name
    uri: str
    manifest: ModelManifest | None  # None when model.json is unreadable or invalid ...
    problem: str | None = None  # ... and this says why, in one line


def list_model_versions(models_root: str) -> list[ModelVersion]:
    """Complete versions under ``models_root``, newest ``created_at`` first; those whose model.json
    is invalid (``manifest`` None, ``problem`` set) come last. Directories without model.json
    (exports in progress or interrupted) are not listed; a missing root lists nothing."""
    root = str(models_root).strip().rstrip("/")
    complete, _, _ = _scan(root)
    out = []
    for name in complete:
        uri = storage.join(root, name)
        try:
            manifest, problem = _read_manifest(uri), None
            if manifest.version != name:
                manifest, problem = None, f"{uri}: directory name differs from model.json version {manifest.version!r}"
        except CheckpointError as e:
            manifest, problem = None, str(e)
        out.append(ModelVersion(name, uri, manifest, problem))
    valid = sorted((v for v in out if v.manifest), key=lambda v: (v.manifest.created_at, v.version), reverse=True)
    return valid + sorted((v for v in out if not v.manifest), key=lambda v: v.version, reverse=True)


def _prune(root: str, keep: int, protect: set[str]) -> None:
    for v in [v for v in list_model_versions(root) if v.manifest][keep:]:
        if v.version not in protect:
            _delete_version(v.uri)
    _, incomplete, newest = _scan(root)
    for name, mtime in incomplete.items():
        if newest and mtime and newest - mtime > STALE_INCOMPLETE and name not in protect:
            _delete_version(storage.join(root, name))


def _scan(root: str) -> tuple[list[str], dict[str, datetime | None], datetime | None]:
    """One recursive listing of ``root``: (complete version dir names, {incomplete name: newest
    mtime in it}, newest file mtime under root). Only names that are valid version ids count."""
    fs, path = storage.filesystem(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise CheckpointError(f"{root}: cannot list model versions ({_one_line(e)})") from e
    seen: dict[str, list[pafs.FileInfo]] = {}
    complete = set()
    for info in infos:
        name, _, rest = info.path[len(path) :].lstrip("/").partition("/")
        if not _VERSION_RE.fullmatch(name) or not (rest or info.type == pafs.FileType.Directory):
            continue
        seen.setdefault(name, []).append(info)
        if rest == MANIFEST_FILE and info.type == pafs.FileType.File:
            complete.add(name)
    mtimes = [i.mtime for i in infos if i.type == pafs.FileType.File and i.mtime]
    incomplete = {
        name: max((i.mtime for i in entries if i.mtime), default=None)
        for name, entries in seen.items()
        if name not in complete
    }
    return sorted(complete), incomplete, max(mtimes, default=None)


def _delete_version(uri: str) -> None:
    """model.json first, so the version stops being complete before any weight is removed."""
    json_uri = storage.join(uri, MANIFEST_FILE)
    try:
        if storage.exists(json_uri):
            fs, path = storage.filesystem(json_uri)
            fs.delete_file(path)
        storage.delete_dir(uri)
    except (storage.StorageError, OSError) as e:
        raise CheckpointError(f"{uri}: cannot delete old model version ({_one_line(e)})") from e


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------
# Load


def load_model(
    uri: str, device: str | torch.device = "cpu", *, expect_sha256: str | None = None
) -> tuple[nn.Module, ModelManifest]:
    """Load a checkpoint (model directory, model.json or pointer .json) into its registered
    architecture; returns ``(model in eval mode on device, manifest)``. The weights bytes must
    hash to model.json's ``weights_sha256``, which must equal the pointer's ``sha256`` (when
    loading through a pointer) and ``expect_sha256`` (when given, e.g. by a worker that must load
    exactly the model its driver checked)."""
    from safetensors.torch import load

    model_uri, manifest = _resolve(uri)
    manifest = manifest or _read_manifest(model_uri)
    json_uri = storage.join(model_uri, MANIFEST_FILE)
    if expect_sha256 is not None and manifest.weights_sha256 != expect_sha256:
        raise CheckpointError(
            f"{json_uri}: weights sha256 {manifest.weights_sha256} but {expect_sha256} was expected; "
            "the model changed since it was checked"
        )
    weights_uri = storage.join(model_uri, WEIGHTS_FILE)
    try:
        blob = storage.read_bytes(weights_uri)
    except storage.StorageError as e:
        raise CheckpointError(
            f"{weights_uri}: missing or unreadable ({e}); the checkpoint is incomplete, re-save it"
        ) from e
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
    model = _architecture_for(manifest, sd, lambda problem: CheckpointError(
        f"{weights_uri}: does not match {json_uri} (architecture "
        f"{manifest.architecture!r}, {manifest.num_classes} classes): {problem}"))
    if count_parameters(model) != manifest.num_parameters:
        raise CheckpointError(
            f"{json_uri}: field num_parameters = {manifest.num_parameters} but architecture "
            f"{manifest.architecture!r} with {manifest.num_classes} classes has {count_parameters(model)}"
        )
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), manifest


def load_manifest(uri: str) -> ModelManifest:
    """The validated manifest of a checkpoint (model directory, model.json or pointer .json; a
    pointer's version and sha256 are checked against it). The weights are not read."""
    model_uri, manifest = _resolve(uri)
    return manifest or _read_manifest(model_uri)


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


@dataclass(frozen=True)
class Pointer:
    """A parsed pointer file. ``model_uri`` is resolved (relative ones against the pointer's
    directory); ``version`` and ``sha256`` are None in pointers written before they were recorded."""

    uri: str
    model_uri: str
    version: str | None
    sha256: str | None
    published_at: str | None


def read_pointer(pointer_uri: str) -> Pointer | None:
    """The pointer at ``pointer_uri``, or None when there is none yet; a file that is not a valid
    pointer is a :class:`CheckpointError`. The model it names is not read."""
    uri = str(pointer_uri).strip()
    if not _exists(uri):
        return None
    return _parse_pointer(uri, _read_json(uri, "model pointer"))


def _parse_pointer(uri: str, d: dict) -> Pointer:
    def bad(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{uri}: invalid model pointer: {_bad(name, d.get(name), problem)}")

    if not isinstance(d.get("model_uri"), str) or not d["model_uri"].strip():
        raise bad("model_uri", "must be a non-empty string")
    version, sha = d.get("version"), d.get("sha256")
    if version is not None and not (isinstance(version, str) and _VERSION_RE.fullmatch(version)):
        raise bad("version", "must be a model version id")
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        raise bad("sha256", "must be 64 lowercase hex digits")
    published = d.get("published_at")
    target = _resolve_relative(uri, d["model_uri"].strip().rstrip("/"))
    return Pointer(uri, target, version, sha, published if isinstance(published, str) else None)


def resolve_model_uri(uri: str) -> str:
    """Model directory for ``uri``: a pointer .json is followed (and checked, see :func:`load_model`),
    a model.json gives its directory, a directory with model.json is returned as is, and a
    directory with only a latest.json is followed through it."""
    return _resolve(uri)[0]


def _resolve(uri: str) -> tuple[str, ModelManifest | None]:
    """(model directory, its manifest when a pointer was followed and checked, else None)."""
    uri = str(uri).strip().rstrip("/")
    if uri.endswith(".json"):
        d = _read_json(uri, "model pointer")
        if "model_uri" in d:
            return _follow(_parse_pointer(uri, d))
        if "architecture" in d:  # a model.json itself
            return (uri.rsplit("/", 1)[0] if "/" in uri else "."), None
        raise CheckpointError(f"{uri}: neither a model pointer (no 'model_uri') nor a {MANIFEST_FILE}")
    if _exists(storage.join(uri, MANIFEST_FILE)):
        return uri, None
    if _exists(storage.join(uri, POINTER_FILE)):
        return _resolve(storage.join(uri, POINTER_FILE))
    if not _exists(uri):
        raise CheckpointError(
            f"{uri}: no checkpoint there (not found); pass a model directory or a pointer .json"
        )
    raise CheckpointError(
        f"{storage.join(uri, MANIFEST_FILE)}: missing (incomplete checkpoint: model.json is written "
        "last); re-save the model or point at another version"
    )


def _follow(pointer: Pointer) -> tuple[str, ModelManifest]:
    """The pointer's model directory and manifest, refusing a model that is not the one published."""
    json_uri = storage.join(pointer.model_uri, MANIFEST_FILE)
    if not _exists(json_uri):
        raise CheckpointError(
            f"{pointer.uri}: points to {pointer.model_uri}, which holds no {MANIFEST_FILE} "
            "(deleted or incomplete checkpoint); publish a complete version"
        )
    manifest = _read_manifest(pointer.model_uri)
    if (pointer.version not in (None, manifest.version)) or (pointer.sha256 not in (None, manifest.weights_sha256)):
        raise CheckpointError(
            f"{pointer.uri}: names version {pointer.version} with weights sha256 {pointer.sha256} but "
            f"{json_uri} has version {manifest.version} with sha256 {manifest.weights_sha256}; the model "
            "was replaced after it was published: publish a version again (python -m jobs.publish)"
        )
    return pointer.model_uri, manifest


def write_pointer(pointer_uri: str, model_uri: str, manifest: ModelManifest) -> None:
    """Atomically publish ``model_uri`` (absolute, or relative to the pointer's directory) at
    ``pointer_uri`` (a .json path), recording its version and weights sha256. Refuses a directory
    without model.json, or whose model.json is not ``manifest``'s version and weights
    (:class:`CheckpointError`); a failed write is a ``storage.StorageError``."""
    pointer_uri = str(pointer_uri).strip()
    if not pointer_uri.endswith(".json"):
        raise ValueError(f"pointer {pointer_uri!r} must be a .json file, e.g. .../latest.json")
    model_uri = str(model_uri).strip().rstrip("/")
    target = _resolve_relative(pointer_uri, model_uri)
    json_uri = storage.join(target, MANIFEST_FILE)
    if not _exists(json_uri):
        raise CheckpointError(f"{json_uri}: missing; save the model before publishing a pointer to it at {pointer_uri}")
    saved = _read_manifest(target)
    if (saved.version, saved.weights_sha256) != (manifest.version, manifest.weights_sha256):
        raise CheckpointError(
            f"{json_uri}: has version {saved.version} with sha256 {saved.weights_sha256}, not version "
            f"{manifest.version} with sha256 {manifest.weights_sha256}; refusing to publish it at {pointer_uri}"
        )
    payload = {
        "model_uri": model_uri,
        "version": saved.version,
        "sha256": saved.weights_sha256,
        "architecture": saved.architecture,
        "classes": list(saved.classes),
        "published_at": utc_now_iso(),
    }
    storage.write_bytes(pointer_uri, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))  # StorageError: outage


def _resolve_relative(pointer_uri: str, model_uri: str) -> str:
    if urlparse(model_uri).scheme in ("s3", "s3a", "file") or os.path.isabs(model_uri):
        return model_uri.rstrip("/")
    loc = storage.parse(pointer_uri)
    if loc.is_s3:
        return "s3://" + posixpath.normpath(posixpath.join(posixpath.dirname(loc.path), model_uri))
    return os.path.normpath(os.path.join(os.path.dirname(loc.path), model_uri))


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except (storage.StorageError, OSError) as e:
        raise CheckpointError(f"{uri}: cannot check whether it exists ({e})") from e
