"""Classification scores every classifier family reports (images, text, tables): plain torch."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class, predicted class) pairs: rows are true classes."""
    index = target.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (a class absent from both counts 0)."""
    confusion = confusion.double()
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    return {
        "accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def write_confusion(out_dir: Path, confusion: list[list[int]], class_names: list[str]) -> None:
    """Saves the confusion matrix as JSON and as a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    (out_dir / "confusion_matrix.json").write_text(
        json.dumps({"classes": class_names, "matrix": confusion})
    )
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 1 + 0.45 * len(class_names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            color = "white" if n > matrix.max() / 2 else "black"
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion_matrix.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
