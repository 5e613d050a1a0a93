"""Emotion class names.

The canonical order is FER2013's: angry, disgust, fear, happy, neutral, sad, surprise.
A model's class list comes from its training data (folder names, any subset of the seven, in
canonical order) and is stored in its checkpoint manifest; nothing downstream assumes seven.
"""

from __future__ import annotations

from collections.abc import Iterable

CANONICAL: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

ALIASES: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "mad": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "contempt": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "calm": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
}


class UnknownLabelError(ValueError):
    """A folder or label name that is not one of the seven emotions or their aliases."""


def canonical_label(name: str) -> str:
    """Map a folder/label name (any case, surrounding whitespace, aliases) to its canonical name."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    # Kaggle variants sometimes number the folders: "3_happy" / "happy_3".
    for candidate in (key, key.split("_", 1)[-1], key.rsplit("_", 1)[0]):
        if candidate in ALIASES:
            return ALIASES[candidate]
    raise UnknownLabelError(
        f"unknown emotion class {name!r}; expected one of {', '.join(CANONICAL)} "
        f"(or an alias such as {', '.join(sorted(set(ALIASES) - set(CANONICAL))[:6])}, ...)"
    )


def sort_classes(names: Iterable[str]) -> list[str]:
    """Canonicalise and de-duplicate class names, returned in FER order."""
    canon = {canonical_label(n) for n in names}
    return [c for c in CANONICAL if c in canon]


def class_index(classes: list[str]) -> dict[str, int]:
    """Map canonical class name -> index in a model's class list."""
    return {c: i for i, c in enumerate(classes)}
