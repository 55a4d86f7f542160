"""The tabular MLP: plain PyTorch, no Ray; and the trained model as ``bundle.load_model`` gives
it, taking raw rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def embedding_dim(cardinality: int, cap: int) -> int:
    """Width of a categorical column's embedding: fast.ai's rule of thumb
    (1.6 * levels^0.56), at least 1 and at most ``cap``."""
    return max(1, min(cap, round(1.6 * cardinality**0.56)))


class PeriodicEmbeddings(nn.Module):
    """Periodic embeddings of numeric features (PLR in Gorishniy, Rubachev and Babenko, "On
    Embeddings for Numerical Features in Tabular Deep Learning", NeurIPS 2022): feature ``j``
    of value ``x`` becomes ``ReLU(W_j [sin(2 pi c_j x), cos(2 pi c_j x)] + b_j)``, with its own
    learned frequencies ``c_j`` (initialized from N(0, sigma^2)) and linear layer. An MLP reads
    a function of one feature as easily as a line through it; boosted trees get that from
    their splits.

    Args:
        features: numeric input features.
        frequencies: ``k``, frequencies per feature (its embedding reads 2k values).
        sigma: the spread of the initial frequencies (inputs are standardized).
        dim: the width of each feature's embedding.
    """

    def __init__(self, features: int, frequencies: int, sigma: float, dim: int):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(features, frequencies) * sigma)
        bound = (2 * frequencies) ** -0.5  # nn.Linear's initialization, per feature
        self.weight = nn.Parameter(
            torch.empty(features, 2 * frequencies, dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(features, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, features) -> (N, features * dim)."""
        angles = 2 * torch.pi * self.frequencies * x.unsqueeze(-1)  # (N, features, k)
        periodic = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        out = torch.einsum("nfk,fkd->nfd", periodic, self.weight) + self.bias
        return torch.relu(out).flatten(1)


class MLP(nn.Module):
    """Numeric features (as they are, or their periodic embeddings) and a learned embedding of
    each categorical column, concatenated, then one block per entry of ``widths`` (Linear,
    normalization, ReLU, dropout) and a linear head.

    Args:
        numeric: numeric input features.
        cardinalities: codes per categorical column (its train levels + the unseen bucket 0).
        embedding_dims: the embedding width of each categorical column.
        widths: hidden widths, one block each (none: a linear model of the inputs).
        outputs: 1 for a regression, the number of classes for a classification.
        dropout: dropout after each block.
        norm: ``batch`` or ``layer`` normalization after each hidden Linear, or ``none``.
        numeric_embedding: ``{"kind": "periodic", "frequencies", "sigma", "dim"}``
            (:class:`PeriodicEmbeddings`), or None: the numeric features enter as they are.
    """

    def __init__(
        self,
        numeric: int,
        cardinalities: list[int],
        embedding_dims: list[int],
        widths: list[int],
        outputs: int,
        dropout: float = 0.1,
        norm: str = "batch",
        numeric_embedding: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.hparams = {
            "numeric": numeric,
            "cardinalities": list(cardinalities),
            "embedding_dims": list(embedding_dims),
            "widths": list(widths),
            "outputs": outputs,
            "dropout": dropout,
            "norm": norm,
            "numeric_embedding": numeric_embedding,
        }
        self.embeddings = nn.ModuleList(
            nn.Embedding(n, d) for n, d in zip(cardinalities, embedding_dims, strict=True)
        )
        self.numeric_embedding = None
        numeric_width = numeric
        if numeric_embedding is not None and numeric > 0:
            options = {k: v for k, v in numeric_embedding.items() if k != "kind"}
            self.numeric_embedding = PeriodicEmbeddings(numeric, **options)
            numeric_width = numeric * options["dim"]
        layers: list[nn.Module] = []
        width = numeric_width + sum(embedding_dims)
        for hidden in widths:
            layers.append(nn.Linear(width, hidden))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            elif norm == "layer":
                layers.append(nn.LayerNorm(hidden))
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, outputs)

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        if self.numeric_embedding is not None:
            x_num = self.numeric_embedding(x_num)
        parts = [x_num, *(emb(x_cat[:, i]) for i, emb in enumerate(self.embeddings))]
        return self.head(self.body(torch.cat(parts, dim=1)))

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> MLP:
        return cls(**hparams)


def load(bundle) -> TabularModel:
    """The loader a ``model/mlp`` bundle names: the trained model, ready to predict."""
    return TabularModel(bundle)


class TabularModel:
    """A trained tabular MLP for inference (CPU, eval mode): what ``bundle.load_model`` gives.

    It takes raw rows (row dicts, or a pandas DataFrame, in the source's own units and
    categories) and applies what the data stage applied: missing values filled, numeric
    features normalized, categories encoded (a category the train split never held falls into
    the unseen bucket). A regression's predictions are in the target's own units.

    Attributes:
        module: the :class:`MLP`.
        bundle: its bundle (the table's description in ``bundle.meta["table"]``).
        spec: that description (``components.data.table.TableSpec``).
    """

    def __init__(self, bundle):
        from components.bundle import build_module
        from components.data.table import TableSpec

        self.bundle = bundle
        self.module = build_module(bundle, MLP.from_hparams)
        self.spec = TableSpec.from_dict(bundle.meta["table"])

    def outputs(self, x_num: np.ndarray, x_cat: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Raw outputs (float64) of encoded inputs: standardized values (regression, (N,)) or
        logits ((N, C))."""
        parts = []
        with torch.no_grad():
            for i in range(0, len(x_num), batch_size):
                num = torch.as_tensor(np.ascontiguousarray(x_num[i : i + batch_size]))
                cat = torch.as_tensor(np.ascontiguousarray(x_cat[i : i + batch_size]))
                parts.append(self.module(num, cat).double().numpy())
        width = self.module.hparams["outputs"]
        out = np.concatenate(parts) if parts else np.zeros((0, width))
        return out[:, 0] if self.spec.regression else out

    def predict(self, rows, batch_size: int = 4096) -> np.ndarray:
        """Predictions for raw rows: values in the target's own units (float64, regression) or
        class ids (int64, classification).

        Raises:
            ValueError: a row lacks a column or holds a value the model cannot take (names the
                row and column).
        """
        out = self.outputs(*self.spec.encode_rows(rows), batch_size=batch_size)
        return self.spec.target_units(out) if self.spec.regression else out.argmax(axis=1)

    def probabilities(self, rows, batch_size: int = 4096) -> np.ndarray:
        """Class probabilities (N, C) of raw rows (classification)."""
        if self.spec.regression:
            raise ValueError("a regression model gives values (predict), not probabilities")
        logits = torch.as_tensor(self.outputs(*self.spec.encode_rows(rows), batch_size))
        return torch.softmax(logits, dim=1).numpy()
