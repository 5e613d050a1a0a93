"""Classification metrics from a confusion matrix (pure numpy).

Everything is derived from one integer confusion matrix ``cm[true, pred]``: it is cheap to
all-reduce across Ray Train workers (a k x k sum) and exact, unlike averaging per-worker scores.
Classes with no support and no predictions get precision = recall = F1 = 0 and still count in the
macro average, as scikit-learn does with ``zero_division=0``.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j`` (int64)."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat[: num_classes * num_classes].reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a, dtype=np.float64)
    np.divide(a, b, out=out, where=b > 0)
    return out


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support arrays."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def accuracy(cm: np.ndarray) -> float:
    cm = np.asarray(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def macro_f1(cm: np.ndarray) -> float:
    return float(per_class(cm)["f1"].mean()) if len(cm) else 0.0


def summary(cm: np.ndarray, classes: list[str]) -> dict:
    """JSON-ready metrics: accuracy, macro-F1, per-class P/R/F1/support and the matrix itself."""
    pc = per_class(cm)
    return {
        "accuracy": accuracy(cm),
        "macro_f1": macro_f1(cm),
        "num_samples": int(np.asarray(cm).sum()),
        "classes": list(classes),
        "per_class": {
            c: {
                "precision": float(pc["precision"][i]),
                "recall": float(pc["recall"][i]),
                "f1": float(pc["f1"][i]),
                "support": int(pc["support"][i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": np.asarray(cm, dtype=np.int64).tolist(),
    }


def format_table(metrics: dict) -> str:
    """A plain-text per-class table in the style of scikit-learn's classification_report."""
    classes = metrics["classes"]
    width = max([len(c) for c in classes] + [len("macro avg")])
    lines = [f"{'':>{width}}  precision  recall  f1-score  support"]
    for c in classes:
        r = metrics["per_class"][c]
        lines.append(
            f"{c:>{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:8.3f}  {r['support']:7d}"
        )
    n = metrics["num_samples"]
    mp = np.mean([metrics["per_class"][c]["precision"] for c in classes]) if classes else 0.0
    mr = np.mean([metrics["per_class"][c]["recall"] for c in classes]) if classes else 0.0
    lines.append("")
    lines.append(f"{'accuracy':>{width}}  {'':9}  {'':6}  {metrics['accuracy']:8.3f}  {n:7d}")
    lines.append(f"{'macro avg':>{width}}  {mp:9.3f}  {mr:6.3f}  {metrics['macro_f1']:8.3f}  {n:7d}")
    return "\n".join(lines)
