"""Tokenizers: characters, or byte-level BPE trained by Hugging Face ``tokenizers`` (in Rust).

Both are trained on the train split only and saved as one JSON file in the dataset artifact
(``tokenizer.json``) and again in every model bundle's ``meta``, so a model always decodes with
the vocabulary it was trained on. Ids 0 and 1 are ``<pad>`` and ``<unk>`` in both.

>>> tok = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=4096))
>>> ids = tok.encode("To be, or not to be")
>>> tok.decode(ids)
'To be, or not to be'
>>> Tokenizer.from_json(tok.to_json()).encode("To be") == ids[:2]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pipelines.guards import not_unicode

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
FORMAT = "raypipe.tokenizer/1"


def _check_unicode(texts: list[str]) -> None:
    for i, text in enumerate(texts):
        if problem := not_unicode(text):
            raise ValueError(f"text {i}: {problem}")


class Tokenizer:
    """Text to ids and back; built by :func:`train_tokenizer` or :meth:`from_json`.

    Attributes:
        kind: ``char`` or ``bpe``.
        lowercase: whether texts are lowercased first.
        vocab_size: ids are in ``[0, vocab_size)``.
    """

    def __init__(self, kind: str, lowercase: bool, chars: list[str] | None = None, bpe=None):
        self.kind, self.lowercase = kind, lowercase
        self._codes = None
        self._chars = chars
        self._bpe = bpe
        if kind == "char":
            self._ids = {c: i for i, c in enumerate(chars)}
            self.vocab_size = len(chars)
        else:
            self.vocab_size = bpe.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The ids of one text (unknown characters become ``<unk>``)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (BPE encodes a batch in parallel threads).

        Raises:
            ValueError: a text is not valid Unicode (it says which and where).
        """
        _check_unicode(texts)
        if self.lowercase:
            texts = [t.lower() for t in texts]
        if self.kind == "char":
            ids = self._ids
            return [[ids.get(c, UNK_ID) for c in text] for text in texts]
        return [e.ids for e in self._bpe.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list:
        """The ids of each text as an int32 array, as :meth:`encode_batch` gives them; a
        character vocabulary looks whole texts up at once (numpy), not character by
        character.

        Raises:
            ValueError: a text is not valid Unicode (it says which and where).
        """
        import numpy as np

        if self.kind != "char":  # encode_batch checks the texts
            return [np.asarray(ids, np.int32) for ids in self.encode_batch(texts)]
        _check_unicode(texts)
        if self._codes is None:  # the sorted code points of the vocabulary, and their ids
            singles = [(ord(c), i) for c, i in self._ids.items() if len(c) == 1]
            singles.sort()
            self._codes = (
                np.array([c for c, _ in singles], np.uint32),
                np.array([i for _, i in singles], np.int32),
            )
        codes, ids = self._codes
        out = []
        for text in texts:
            text = text.lower() if self.lowercase else text
            points = np.frombuffer(text.encode("utf-32-le"), "<u4")
            at = np.minimum(np.searchsorted(codes, points), max(len(codes) - 1, 0))
            known = codes[at] == points if len(codes) else np.zeros(len(points), bool)
            out.append(np.where(known, ids[at] if len(codes) else 0, UNK_ID).astype(np.int32))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of some ids (``<pad>`` dropped, ``<unk>`` shown as is)."""
        ids = [int(i) for i in ids if int(i) != PAD_ID]
        if self.kind == "char":
            return "".join(self._chars[i] for i in ids)
        return self._bpe.decode(ids, skip_special_tokens=False)

    def unknown(self, text: str) -> list[str]:
        """The characters of ``text`` this vocabulary has no id for (none for BPE)."""
        if self.kind != "char":
            return []
        text = text.lower() if self.lowercase else text
        return sorted({c for c in text if c not in self._ids})

    def to_json(self) -> str:
        """The whole tokenizer as one JSON text (deterministic for the same training)."""
        body: dict[str, Any] = {"format": FORMAT, "kind": self.kind, "lowercase": self.lowercase}
        if self.kind == "char":
            body["chars"] = self._chars
        else:
            body["bpe"] = json.loads(self._bpe.to_str())
        return json.dumps(body, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Rebuilds a tokenizer saved by :meth:`to_json`.

        Raises:
            ValueError: not a raypipe tokenizer.
        """
        body = json.loads(text)
        if body.get("format") != FORMAT:
            raise ValueError(f"not a raypipe tokenizer (format {body.get('format')!r})")
        if body["kind"] == "char":
            return cls("char", body["lowercase"], chars=body["chars"])
        from tokenizers import Tokenizer as HFTokenizer

        return cls("bpe", body["lowercase"], bpe=HFTokenizer.from_str(json.dumps(body["bpe"])))


def train_tokenizer(texts: Iterable[str], config: Any) -> Tokenizer:
    """Trains a tokenizer of ``config`` (a ``TokenizerConfig``) on ``texts`` (the train split).

    A character vocabulary is sorted by code point; BPE training is deterministic (the same
    texts give the same merges at any thread count).
    """
    if config.lowercase:
        texts = (t.lower() for t in texts)
    if config.kind == "char":
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        kept = sorted(c for c, n in counts.items() if n >= config.min_frequency)
        return Tokenizer("char", config.lowercase, chars=[PAD, UNK, *kept])
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every text encodes (no <unk>) and decodes back exactly.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return Tokenizer("bpe", config.lowercase, bpe=bpe)
