"""The CNN classifier: plain PyTorch, no Ray."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Classifier(nn.Module):
    """A VGG-style CNN: ``depth`` blocks of two 3x3 convolutions, each block doubling the
    channels and halving the resolution, then global average pooling and a linear head.

    Args:
        in_channels: image channels (1 for grayscale).
        num_classes: output classes.
        image_size: (H, W); blocks stop pooling once the resolution reaches 2.
        width: channels of the first block.
        depth: number of blocks.
        dropout: dropout before the head.
        batch_norm: batch norm after each convolution.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 32,
        depth: int = 2,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ):
        super().__init__()
        self.hparams = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_size": list(image_size),
            "width": width,
            "depth": depth,
            "dropout": dropout,
            "batch_norm": batch_norm,
        }
        layers: list[nn.Module] = []
        channels, size = in_channels, min(image_size)
        for i in range(depth):
            out = width * 2**i
            for j in range(2):
                layers.append(nn.Conv2d(channels if j == 0 else out, out, 3, padding=1))
                layers.append(nn.BatchNorm2d(out) if batch_norm else nn.Identity())
                layers.append(nn.ReLU(inplace=True))
            if size >= 4:  # never pool below 2x2
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations (N, feature_dim): used for Frechet distances."""
        return self.pool(self.body(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> Classifier:
        return cls(**{**hparams, "image_size": tuple(hparams["image_size"])})


def load(bundle) -> ClassifierModel:
    """The loader a ``model/classifier`` bundle names: the trained classifier, ready to predict."""
    return ClassifierModel(bundle)


class ClassifierModel:
    """A trained classifier for inference (CPU, eval mode): what ``bundle.load_model`` gives.

    Attributes:
        module: the :class:`Classifier`.
        bundle: its bundle (normalization in ``bundle.meta``, classes in ``bundle.labels``).
    """

    def __init__(self, bundle):
        from components.bundle import build_module

        self.bundle = bundle
        self.module = build_module(bundle, Classifier.from_hparams)

    def logits(self, images, batch_size: int = 512) -> torch.Tensor:
        """Logits of normalized float32 images (N, C, H, W) (numpy or tensor)."""
        import numpy as np

        x = torch.as_tensor(np.array(images, dtype=np.float32))  # a writable copy
        with torch.no_grad():
            parts = [self.module(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.bundle.hparams["num_classes"])

    def probabilities(self, images, batch_size: int = 512) -> torch.Tensor:
        """Class probabilities (N, C) of normalized float32 images (N, C, H, W)."""
        return torch.softmax(self.logits(images, batch_size).float(), dim=1)

    def predict(self, images, batch_size: int = 512) -> torch.Tensor:
        """Class predictions of normalized float32 images (N, C, H, W)."""
        return self.logits(images, batch_size).argmax(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of normalized images (what Frechet distances compare)."""
        return self.module.features(x)
