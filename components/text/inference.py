"""The loaders text bundles name, and what they build: a trained model for inference (CPU, eval
mode) that takes what a user holds, strings (``components/bundle.py``).

>>> model = load_model(artifact)                    # components.bundle.load_model
>>> model.predict(["a joyless, plodding mess"])     # a text classifier: label ids
>>> model.generate("ROMEO:", tokens=200, seed=0)    # a language model: the completion
"""

from __future__ import annotations

import torch

from components.bundle import build_module
from components.text.tokenizer import Tokenizer


def load_classifier(bundle) -> TextClassifierModel:
    """The loader of a ``model/text-classifier`` bundle."""
    return TextClassifierModel(bundle)


def load_lm(bundle) -> LanguageModel:
    """The loader of a ``model/lm`` bundle."""
    return LanguageModel(bundle)


class TextClassifierModel:
    """A trained text classifier: what ``bundle.load_model`` gives for ``model/text-classifier``.

    Attributes:
        module: the ``models.LSTMClassifier``.
        bundle: its bundle (classes in ``bundle.labels``, the tokenizer in ``bundle.meta``).
        tokenizer: the tokenizer it was trained with.
    """

    def __init__(self, bundle):
        from components.text.models import LSTMClassifier

        self.bundle = bundle
        self.module = build_module(bundle, lambda hp: LSTMClassifier(**hp))
        self.tokenizer = Tokenizer.from_json(bundle.meta["tokenizer"])
        self.max_tokens = int(bundle.meta["max_tokens"])

    def logits(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Logits (N, C) of texts, tokenized as in training (truncated to ``max_tokens``).

        Raises:
            TypeError: ``texts`` is a string, or holds something that is not one.
        """
        import numpy as np

        from components.text.common import padded

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        ids = [row[: self.max_tokens] for row in self.tokenizer.encode_batch(list(texts))]
        offsets = np.cumsum([0] + [len(row) for row in ids])
        flat = np.fromiter((i for row in ids for i in row), np.int64, count=int(offsets[-1]))
        parts = []
        with torch.no_grad():
            for lo in range(0, len(ids), batch_size):
                x, lengths = padded(
                    (flat, offsets), np.arange(lo, min(lo + batch_size, len(ids))), "cpu"
                )
                parts.append(self.module(x, lengths).float())
        return torch.cat(parts) if parts else torch.zeros(0, self.bundle.output["num_classes"])

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """Class probabilities (N, C) of texts."""
        return torch.softmax(self.logits(texts), dim=1)

    def predict(self, texts: list[str]) -> torch.Tensor:
        """The label id of each text (``bundle.labels`` names them)."""
        return self.logits(texts).argmax(1)


class LanguageModel:
    """A trained language model (GPT or LSTM): what ``bundle.load_model`` gives for
    ``model/lm``.

    Attributes:
        module: the ``models.GPT`` or ``models.LSTMLanguageModel``.
        bundle: its bundle (the tokenizer in ``bundle.meta``).
        tokenizer: the tokenizer it was trained with.
    """

    def __init__(self, bundle):
        from components.text.models import build_lm

        self.bundle = bundle
        self.module = build_module(bundle, build_lm)
        self.tokenizer = Tokenizer.from_json(bundle.meta["tokenizer"])

    def generate(
        self,
        prompt: str,
        tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """The text of ``tokens`` tokens drawn after ``prompt`` (the completion only).

        The same arguments give the same text (draws from a generator seeded by ``seed``);
        ``temperature`` 0 takes the most likely token each time.

        Raises:
            ValueError: an empty prompt, characters the vocabulary lacks, or a bad setting
                (the message says which).
        """
        if tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(
                f"tokens >= 0, temperature >= 0 and top_k >= 1 please (got {tokens}, "
                f"{temperature}, {top_k})"
            )
        unknown = self.tokenizer.unknown(prompt)
        if unknown:
            raise ValueError(f"the prompt has characters the model never saw: {unknown}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one character")
        from components.text.models import sample

        out = sample(self.module, ids, tokens, temperature, top_k, seed)
        return self.tokenizer.decode(out)
