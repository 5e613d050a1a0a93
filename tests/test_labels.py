"""Emotion labels: aliases, numbered folders, subsets in FER order, unknown names."""

from __future__ import annotations

import pytest

from emotion_core.labels import CANONICAL, UnknownLabelError, canonical_label, class_index, sort_classes


def test_canonical_order_is_fer():
    assert CANONICAL == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("angry", "angry"),
        ("Anger", "angry"),
        ("ANGRY", "angry"),
        ("disgusted", "disgust"),
        ("Fearful", "fear"),
        ("happiness", "happy"),
        ("Happy", "happy"),
        ("neutral", "neutral"),
        ("SADNESS", "sad"),
        ("surprised", "surprise"),
        ("Surprise", "surprise"),
        ("  sad \n", "sad"),
        ("3_happy", "happy"),
        ("happy_3", "happy"),
        ("0-angry", "angry"),
        ("6 surprise", "surprise"),
    ],
)
def test_aliases_case_whitespace_and_numbers(name, expected):
    assert canonical_label(name) == expected


@pytest.mark.parametrize("name", ["", "bored", "happyish", "7", "contemptuous"])
def test_unknown_label(name):
    with pytest.raises(UnknownLabelError) as e:
        canonical_label(name)
    assert isinstance(e.value, ValueError)
    assert "expected one of angry, disgust" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "folders,expected",
    [
        (["sad", "happy"], ["happy", "sad"]),
        (["Surprised", "anger", "happiness"], ["angry", "happy", "surprise"]),
        (
            ["surprise", "sad", "neutral", "happy", "fear", "angry"],
            ["angry", "fear", "happy", "neutral", "sad", "surprise"],
        ),
        (list(reversed(CANONICAL)), list(CANONICAL)),
        (["happy", "Happiness", "HAPPY"], ["happy"]),
        ([], []),
    ],
    ids=["2", "3", "6", "7", "dupes", "empty"],
)
def test_sort_classes_subsets_in_fer_order(folders, expected):
    assert sort_classes(folders) == expected


def test_sort_classes_rejects_unknown():
    with pytest.raises(UnknownLabelError, match="bored"):
        sort_classes(["happy", "bored"])


def test_class_index():
    assert class_index(["happy", "sad"]) == {"happy": 0, "sad": 1}
