"""Pure library shared by the training and labelling jobs: labels, preprocessing, models,
checkpoints, storage, the Parquet label schema, and a synthetic-face generator.

Nothing in here starts Ray or orchestrates a job; jobs/ does that. The public API is importable
from the package, as in timm::

    import emotion_core as ec
    model, manifest = ec.load_model("runs/latest.json")
    pixels, width, height = ec.decode_image(open("face.jpg", "rb").read(), manifest.input_spec)

Names are resolved on first use, so ``import emotion_core.schema`` stays light (no torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "emotion_core.models": ["create_model", "list_models", "get_input_spec", "resolve_input_spec",
                            "count_parameters", "register_model", "UnknownModelError"],
    "emotion_core.checkpoint": ["load_model", "load_manifest", "save_model", "write_pointer", "resolve_model_uri",
                                "ModelManifest", "CheckpointError"],
    "emotion_core.preprocess": ["decode_image", "decode_batch", "normalize", "InputSpec", "ImageDecodeError",
                                "IMAGE_EXTENSIONS"],
    "emotion_core.labels": ["CANONICAL", "canonical_label"],
    "emotion_core.schema": ["label_schema", "athena_ddl"],
    "emotion_core.storage": ["StorageError"],
    "emotion_core.synthetic": ["generate_dataset"],
    # Not the functions recognize/annotate: their names are submodules, which importing would shadow.
    "emotion_core.recognize": ["Recognizer", "ImageResult", "FaceResult"],
    "emotion_core.tta": ["tta_probs", "tta_views", "tta_cost", "TTA_MODES"],
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'emotion_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
