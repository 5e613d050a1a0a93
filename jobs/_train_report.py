"""Training artifacts: plots (matplotlib Agg, rendered to bytes so they can go to S3) and tables."""

from __future__ import annotations

import io

import numpy as np


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm, classes: list[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix (recall per true class), counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * k, 0.8 + 0.8 * k))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _figure_bytes(fig)


def training_curves_png(history: list[dict], title: str = "") -> bytes:
    """Loss and accuracy per epoch, train vs validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(ep, [h["train_loss"] for h in history], marker="o", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], marker="o", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [h["train_acc"] for h in history], marker="o", label="train acc")
    a2.plot(ep, [h["val_acc"] for h in history], marker="o", label="val acc")
    a2.plot(ep, [h["val_macro_f1"] for h in history], marker=".", linestyle="--", label="val macro-F1")
    a2.set_xlabel("epoch")
    a2.set_ylabel("score")
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _figure_bytes(fig)


def val_accuracy_vs_minutes_png(curves: dict[str, list[dict]], title: str = "") -> bytes:
    """Validation accuracy against wall-clock minutes of the training loop, one line per run
    (``curves``: label -> the run's history, whose ``elapsed_s`` and ``val_acc`` are plotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, history in curves.items():
        ax.plot([h["elapsed_s"] / 60 for h in history], [h["val_acc"] for h in history], marker=".", label=label)
    ax.set_xlabel("training wall-clock minutes")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _figure_bytes(fig)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the others right-aligned)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_rows(headers: list[str], rows: list[list]) -> str:
    """A fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
