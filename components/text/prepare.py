"""``text.prepare``: text sources -> cleaning + quarantine -> split -> tokenizer (trained on
train) -> Parquet shards of token ids, ``tokenizer.json`` and ``dataset.json``.

How the work runs on Ray, and why the output never depends on it:

1. **read** (a task per file): decode and check every text (``sources.py``); the driver gets
   the kept texts, their labels and locations, and the rejects.
2. **dedup + split** (driver): exact duplicates by a hash of the stripped text. Classification:
   a seeded split stratified by label over *distinct* texts, so a text and its duplicates
   share a split. Language modelling: the documents joined in source order, train the head
   of the characters, validation the stretch after it and test the tail (cut at line starts).
3. **tokenizer** (driver): characters or byte-level BPE, trained on the train split only.
4. **tokenize + write** (tasks): classification: a task per shard (ids truncated to
   ``max_tokens``, lengths, labels, row ids); language modelling: a task per run of
   document pieces (a few runs per CPU), then the driver cuts each split's token stream into
   rows of ``block_tokens`` + 1 ids. The shards are encoded with the pinned Parquet options of
   ``components/data/shards.py``.

``tasks`` changes how the work is cut, never a byte of output: the tests check this.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.api import Component, StageContext
from components.contract import TrialData
from components.text.config import TextPrepareConfig

SPLITS = ("train", "val", "test")
DATASET_FILE = "dataset.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "raypipe.dataset/1"


def kind_of(task: str) -> str:
    """The artifact kind of a text dataset prepared for ``task``."""
    return f"dataset/text/{task}"


class RejectedRowsError(ValueError):
    """Too many texts were quarantined, or no text is left to train on."""


class TextPrepare(Component):
    """Cleans, splits and tokenizes texts into Parquet shards of token ids (see module doc)."""

    version = "1"
    Config = TextPrepareConfig
    produces = "dataset/text"  # dataset/text/<task>: see artifact_kind
    resources_affect_output = False

    def artifact_kind(self, config: TextPrepareConfig, ctx: StageContext) -> str:
        """``dataset/text/classification`` or ``dataset/text/language_model``: a model asks
        for the texts of its task."""
        return kind_of(config.task)

    def source_paths(self, config: TextPrepareConfig) -> list[str]:
        from components.data.sources import SourceError
        from components.text.sources import resolve_paths

        found = []
        for path in config.source.paths:
            try:
                found += resolve_paths([path])
            except SourceError:
                found.append(path)  # the stage reports it, with the reason
        return found

    def run(self, ctx: StageContext, config: TextPrepareConfig) -> dict[str, Any]:
        return prepare(config, ctx.out_dir, report=ctx.report)


def prepare(config: TextPrepareConfig, out_dir: Path, report=None) -> dict[str, Any]:
    """Runs the whole stage into ``out_dir``; returns its metrics.

    Raises:
        SourceError: a file cannot be read as its kind (the message names it).
        RejectedRowsError: too many texts were quarantined, or none is left.
    """
    import ray

    from components.data.prepare import _run_tasks, _write_quarantine
    from components.data.sources import SourceError
    from components.text import sources
    from components.text.tokenizer import train_tokenizer

    if not ray.is_initialized():
        ray.init()
    started = time.time()
    out_dir = Path(out_dir)
    report = report or (lambda **_: None)
    limit = config.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.time() - started - sum(phases.values()), 3)

    # 1. read ----------------------------------------------------------------------------------
    paths = sources.resolve_paths(config.source.paths)
    read_task = ray.remote(num_cpus=1)(sources.read)
    args = (config.task, config.classes, config.clean.max_chars)
    chunks = _run_tasks(lambda p: read_task.remote(config.source, p, *args), paths, limit)
    report(rows_done=sum(c.rows_in for c in chunks), phase="read")
    phase("read")

    # 2. dedup + split -------------------------------------------------------------------------
    texts = [t for c in chunks for t in c.texts]
    labels = [label for c in chunks for label in c.labels]
    where = [(c.path, i) for c in chunks for i in c.index]
    rejects = [r for c in chunks for r in c.rejects]
    rows_in = sum(c.rows_in for c in chunks)
    if rows_in == 0:
        raise SourceError(f"{', '.join(config.source.paths)}: no texts to read (empty source)")
    group, duplicates = _duplicates(texts, labels, where)
    by_reason = dict(sorted(Counter(r.reason for r in rejects).items()))
    _check_rejected(rows_in, rejects, by_reason, config.clean.max_rejected_fraction)
    if config.clean.drop_duplicates:
        keep = [i for i in range(len(texts)) if group[i] == i]
        texts, labels, where = (
            [texts[i] for i in keep],
            [labels[i] for i in keep],
            [where[i] for i in keep],
        )
        group = list(range(len(texts)))
    if not texts:
        raise RejectedRowsError(f"text.prepare: no text left of {rows_in} input texts")
    if config.task == "classification":
        class_names = _class_names(config.classes, labels)
        label_ids = [class_names.index(label) for label in labels]
        split_of = _stratified_split(label_ids, group, config.split)
        pieces = {s: [i for i, sp in enumerate(split_of) if sp == s] for s in SPLITS}
        train_texts = [texts[i] for i in pieces["train"]]
    else:
        class_names, label_ids = [], []
        pieces = _contiguous_split(texts, config)
        train_texts = [text for text, _ in pieces["train"]]
    if not train_texts:
        raise RejectedRowsError("text.prepare: the train split is empty; lower split.val/test")
    phase("dedup_split")

    # 3. tokenizer -----------------------------------------------------------------------------
    tokenizer = train_tokenizer(train_texts, config.tokenizer)
    tokenizer_json = tokenizer.to_json()
    (out_dir / TOKENIZER_FILE).write_text(tokenizer_json + "\n")
    phase("tokenizer")

    # 4. tokenize + write ----------------------------------------------------------------------
    if config.task == "classification":
        rows = {s: (pieces[s], [texts[i] for i in pieces[s]]) for s in SPLITS}
        shards, split_facts = _write_classification(
            out_dir, rows, label_ids, tokenizer_json, config, limit
        )
    else:
        shards, split_facts = _write_blocks(out_dir, pieces, tokenizer_json, config, limit)
    report(rows_done=sum(s["rows"] for s in shards), phase="write")
    phase("tokenize_write")

    # The same quarantine shards as data.prepare's (source, index, reason, detail, label).
    quarantine = _write_quarantine(out_dir, rejects + duplicates, config.rows_per_shard)
    accounting = {
        "texts_in": rows_in,
        "kept": len(texts),
        "quarantined": len(rejects),
        "quarantined_by_reason": by_reason,
        "duplicates_removed": len(duplicates) if config.clean.drop_duplicates else 0,
        "duplicates_kept": 0 if config.clean.drop_duplicates else len(duplicates),
        "texts_by_split": {s: split_facts[s]["texts"] for s in SPLITS},
        "rows_out_by_split": {s: split_facts[s]["rows"] for s in SPLITS},
    }
    removed = accounting["duplicates_removed"]
    accounting["balanced"] = rows_in == len(texts) + len(rejects) + removed
    assert accounting["balanced"], accounting  # every text is counted exactly once
    dataset = {
        "format": FORMAT,
        "kind": "text",
        "task": config.task,
        "source": config.source.kind,
        "num_classes": len(class_names),
        "class_names": class_names,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
        },
        "max_tokens": config.max_tokens,
        "block_tokens": config.block_tokens,
        "columns": _columns(config.task),
        "accounting": accounting,
        "splits": {
            s: {**split_facts[s], "shards": [x["path"] for x in shards if x["split"] == s]}
            for s in SPLITS
        },
        "shards": shards,
        "quarantine": {
            "rows": len(rejects) + len(duplicates),
            "columns": ["source", "index", "reason", "detail", "label"],
            "shards": quarantine,
        },
        # ``tasks`` cuts the work, never the output: left out, the file is the same too.
        "config": config.model_dump(mode="json", exclude={"tasks"}),
    }
    (out_dir / DATASET_FILE).write_text(json.dumps(dataset, indent=2, sort_keys=True) + "\n")
    seconds = time.time() - started
    chars = sum(split_facts[s]["chars"] for s in SPLITS)
    return {
        "data/texts_in": rows_in,
        "data/kept": len(texts),
        "data/quarantined": len(rejects),
        "data/duplicates_removed": removed,
        "data/vocab_size": tokenizer.vocab_size,
        **{f"{s}/rows": split_facts[s]["rows"] for s in SPLITS},
        **{f"{s}/tokens": split_facts[s]["tokens"] for s in SPLITS},
        "data/seconds": seconds,
        "data/chars_per_s": chars / seconds if seconds > 0 else 0.0,
        **{f"data/{name}_seconds": t for name, t in phases.items()},
    }


# -- driver helpers ----------------------------------------------------------------------------


def _duplicates(texts: list[str], labels: list, where: list) -> tuple[list[int], list]:
    """The group of each text (the index of its first occurrence) and a ``duplicate`` reject
    for each later occurrence, naming the first."""
    import hashlib

    from components.data.sources import Reject
    from components.text.sources import DUPLICATE

    first: dict[bytes, int] = {}
    group, duplicates = [], []
    for i, text in enumerate(texts):
        key = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()
        j = first.setdefault(key, i)
        group.append(j)
        if j != i:
            other = " (different label)" if labels[i] != labels[j] else ""
            detail = f"same text as {where[j][0]}:{where[j][1]}{other}"
            duplicates.append(Reject(where[i][0], where[i][1], DUPLICATE, detail, labels[i]))
    return group, duplicates


def _check_rejected(rows_in: int, rejects: list, by_reason: dict, fraction: float) -> None:
    """Raises RejectedRowsError when more than ``fraction`` of the texts were quarantined: a
    source that mostly fails is a wrong source (a column, an encoding), not dirty data."""
    if len(rejects) <= fraction * rows_in:
        return
    counts = ", ".join(f"{k}={v}" for k, v in by_reason.items())
    first = "; ".join(f"{r.source}:{r.index} {r.reason} ({r.detail})" for r in rejects[:3])
    raise RejectedRowsError(
        f"text.prepare: {len(rejects)} of {rows_in} texts were quarantined, more than "
        f"clean.max_rejected_fraction={fraction} ({counts}); first: {first}"
    )


def _class_names(classes: list[str] | None, labels: list[str]) -> list[str]:
    """The given classes, or every label found (numbers in numeric order, else sorted).

    Raises:
        RejectedRowsError: fewer than two classes (nothing to tell apart).
    """
    if classes is not None:
        return list(classes)
    found = set(labels)
    numeric = all(label.lstrip("-").isdigit() for label in found)
    names = sorted(found, key=int) if numeric else sorted(found)
    if len(names) < 2:
        raise RejectedRowsError(
            f"text.prepare: classification needs at least 2 classes; the labels are {names}"
        )
    return names


def _stratified_split(label_ids: list[int], group: list[int], split) -> list[str]:
    """The split of every text: per class, a seeded permutation of its distinct texts gives
    the first ``test`` fraction to test and the next ``val`` fraction to val; every text
    follows its group's first occurrence, so duplicates never cross splits."""
    import numpy as np

    firsts = sorted(set(group))
    of_group: dict[int, str] = {}
    for label in sorted({label_ids[g] for g in firsts}):
        members = [g for g in firsts if label_ids[g] == label]
        order = np.random.default_rng([split.seed, label]).permutation(len(members))
        n_test = int(round(split.test * len(members)))
        n_val = int(round(split.val * len(members)))
        for rank, k in enumerate(order):
            of_group[members[k]] = (
                "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            )
    return [of_group[g] for g in group]


def _contiguous_split(texts: list[str], config: TextPrepareConfig) -> dict[str, list]:
    """The documents joined by ``separator``, cut into train (head), val, test (tail) by
    characters, each cut moved forward to the next line start. Each split is a list of
    ``(text, document)`` pieces: a document cut by a boundary gives a piece to each side."""
    sep = config.separator
    starts, pos = [], 0
    for text in texts:
        starts.append(pos)
        pos += len(text) + len(sep)
    whole = sep.join(texts)
    n = len(whole)

    def cut(fraction: float) -> int:
        at = int(round(fraction * n))
        line = whole.find("\n", at)
        return n if line < 0 else line + 1

    bounds = [0, cut(1 - config.split.val - config.split.test), cut(1 - config.split.test), n]
    bounds[2] = max(bounds[1], bounds[2])
    pieces: dict[str, list] = {}
    for s, split in enumerate(SPLITS):
        lo, hi = bounds[s], bounds[s + 1]
        pieces[split] = []
        for d, start in enumerate(starts):
            end = start + len(texts[d]) + (len(sep) if d < len(texts) - 1 else 0)
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces[split].append((whole[a:b], d))
    return pieces


def _columns(task: str) -> dict[str, Any]:
    if task == "classification":
        return {
            "ids": {"dtype": "list<int32>", "note": "truncated to max_tokens"},
            "length": {"dtype": "int32"},
            "label": {"dtype": "int64"},
            "row_id": {"dtype": "int64"},
        }
    return {
        "ids": {"dtype": "list<int32>", "note": "block_tokens + 1 (the last row: fewer)"},
        "block": {"dtype": "int64"},
    }


def _write_classification(out_dir, rows, label_ids, tokenizer_json, config, limit):
    """A task per shard tokenizes its texts and encodes the shard; the stage writes it."""
    import ray

    from components.data.prepare import _run_tasks
    from components.data.shards import shard_name, write_file

    task = ray.remote(num_cpus=1)(_classification_shard)
    ref = ray.put(tokenizer_json)
    jobs = []
    for split in SPLITS:
        ids, texts = rows[split]
        for j, lo in enumerate(range(0, len(ids), config.rows_per_shard)):
            pick = ids[lo : lo + config.rows_per_shard]
            jobs.append(
                {
                    "split": split,
                    "path": shard_name(split, j),
                    "texts": texts[lo : lo + config.rows_per_shard],
                    "labels": [label_ids[i] for i in pick],
                    "row_ids": pick,
                }
            )

    def write(value: dict) -> dict:
        facts = write_file(value.pop("data"), out_dir / value["path"])
        return {**value, **facts}

    shards = _run_tasks(lambda job: task.remote(job, ref, config.max_tokens), jobs, limit, write)
    facts = {}
    for split in SPLITS:
        mine = [s for s in shards if s["split"] == split]
        facts[split] = {
            "texts": len(rows[split][0]),
            "rows": sum(s["rows"] for s in mine),
            "chars": sum(s.pop("chars") for s in mine),
            "tokens": sum(s.pop("tokens") for s in mine),
            "truncated": sum(s.pop("truncated") for s in mine),
            "unknown_tokens": sum(s.pop("unknown") for s in mine),
        }
    return shards, facts


def _classification_shard(job: dict, tokenizer_json: str, max_tokens: int) -> dict:
    import pyarrow as pa

    from components.data.shards import encode_table
    from components.text.tokenizer import UNK_ID, Tokenizer

    tokenizer = Tokenizer.from_json(tokenizer_json)
    encoded = tokenizer.encode_batch(job["texts"])
    kept = [ids[:max_tokens] for ids in encoded]
    table = pa.table(
        {
            "ids": pa.array(kept, pa.list_(pa.int32())),
            "length": pa.array([len(ids) for ids in kept], pa.int32()),
            "label": pa.array(job["labels"], pa.int64()),
            "row_id": pa.array(job["row_ids"], pa.int64()),
        }
    )
    return {
        "path": job["path"],
        "split": job["split"],
        "rows": table.num_rows,
        "data": encode_table(table),
        "chars": sum(len(t) for t in job["texts"]),
        "tokens": sum(len(ids) for ids in kept),
        "truncated": sum(len(ids) > max_tokens for ids in encoded),
        "unknown": sum(ids.count(UNK_ID) for ids in kept),
    }


def _encode_pieces(texts: list[str], tokenizer_json: str) -> list:
    """The ids of each of some document pieces (BPE encodes them in parallel threads)."""

    from components.text.tokenizer import Tokenizer

    return Tokenizer.from_json(tokenizer_json).encode_arrays(texts)


def _groups(sizes: list[int], count: int) -> list[slice]:
    """``count`` (or fewer) contiguous runs of items of about equal total size."""
    bounds, total, acc = [0], max(sum(sizes), 1), 0
    for i, size in enumerate(sizes[:-1], start=1):
        acc += size
        if acc * count >= total * len(bounds):
            bounds.append(i)
    bounds.append(len(sizes))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _block_rows(stream, block: int, lo: int, hi: int):
    """Rows ``lo``..``hi`` of a stream cut into ``block`` + 1 ids each (the last id is the
    next row's first; the final row may be shorter), as a list<int32> array."""
    import numpy as np
    import pyarrow as pa

    starts = np.arange(lo, hi, dtype=np.int64) * block
    ends = np.minimum(starts + block + 1, len(stream))
    offsets = np.zeros(hi - lo + 1, np.int32)
    np.cumsum(ends - starts, out=offsets[1:])
    take = np.repeat(starts - offsets[:-1], ends - starts) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(stream[take], pa.int32()))


def _write_blocks(out_dir, pieces, tokenizer_json, config, limit):
    """Tasks tokenize the document pieces (a few runs of pieces per CPU, so that no task is
    too small to pay for itself); each split's stream (pieces in order) is cut into rows of
    ``block_tokens`` + 1 ids (the last id is the next row's first)."""
    import numpy as np
    import pyarrow as pa
    import ray

    from components.data.prepare import _run_tasks
    from components.data.shards import shard_name, write_table
    from components.text.tokenizer import UNK_ID

    task = ray.remote(num_cpus=1)(_encode_pieces)
    ref = ray.put(tokenizer_json)
    jobs = [(split, text) for split in SPLITS for text, _ in pieces[split]]
    runs = _groups([len(text) for _, text in jobs], 4 * limit)
    done = _run_tasks(lambda run: task.remote([t for _, t in jobs[run]], ref), runs, limit)
    encoded = [ids for part in done for ids in part]
    block = config.block_tokens
    shards, facts = [], {}
    for split in SPLITS:
        parts = [ids for (s, _), ids in zip(jobs, encoded, strict=True) if s == split]
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        rows = len(range(0, max(len(stream) - 1, 0), block))
        for j, lo in enumerate(range(0, rows, config.rows_per_shard)):
            hi = min(lo + config.rows_per_shard, rows)
            table = pa.table(
                {
                    "ids": _block_rows(stream, block, lo, hi),
                    "block": pa.array(range(lo, hi), pa.int64()),
                }
            )
            path = shard_name(split, j)
            shards.append({"path": path, "split": split, **write_table(table, out_dir / path)})
        facts[split] = {
            "texts": len({d for _, d in pieces[split]}),
            "rows": rows,
            "chars": sum(len(text) for text, _ in pieces[split]),
            "tokens": int(len(stream)),
            "unknown_tokens": int((stream == UNK_ID).sum()),
        }
    return shards, facts


# -- reading a text dataset (the families' side) -----------------------------------------------


@dataclass(frozen=True)
class TextSpec:
    """What a text model needs to know of its data, in every worker (picklable).

    Attributes:
        task: ``classification`` or ``language_model``.
        vocab_size: token ids are in ``[0, vocab_size)`` (0 pads).
        tokenizer: the tokenizer's JSON (``tokenizer.Tokenizer.from_json``).
        num_classes: classes (classification; 0 otherwise).
        class_names: a name per label.
        block_tokens: tokens per language-model row (each row holds one more).
        chars_per_token: characters per token of each split (bits per character from nats
            per token).
    """

    task: str
    vocab_size: int
    tokenizer: str
    num_classes: int
    class_names: list[str]
    block_tokens: int
    chars_per_token: dict[str, float]

    @property
    def tokenizer_kind(self) -> str:
        """``char`` or ``bpe``."""
        return json.loads(self.tokenizer)["kind"]

    def input_spec(self) -> dict[str, Any]:
        """The bundle input spec of a model taking these texts (``components/bundle.py``)."""
        return {"type": "text", "vocab_size": self.vocab_size, "tokenizer": self.tokenizer_kind}


def read_text_dataset(ctx: StageContext, component: str, task: str) -> TrialData:
    """The text dataset in ``needs:`` as a model family reads it: train and val (read
    lazily), its :class:`TextSpec` and where it lies.

    Raises:
        ValueError: no text dataset in ``needs:``, or one prepared for another task (each
            names the stage).
    """
    found = ctx.inputs_of("dataset/text")
    data = found[0] if len(found) == 1 else ctx.input(kind_of(task))
    info = json.loads((data.path / DATASET_FILE).read_text())
    if info.get("task") != task:
        raise ValueError(
            f"{component} needs a text dataset prepared with task: {task}; stage "
            f"{data.stage!r} prepared one for {info.get('task')}"
        )
    spec = TextSpec(
        task=task,
        vocab_size=info["tokenizer"]["vocab_size"],
        tokenizer=(data.path / TOKENIZER_FILE).read_text().strip(),
        num_classes=info["num_classes"],
        class_names=info["class_names"],
        block_tokens=info["block_tokens"],
        chars_per_token={
            s: info["splits"][s]["chars"] / max(info["splits"][s]["tokens"], 1) for s in SPLITS
        },
    )
    return TrialData(
        datasets={split: read_split(data.path, split) for split in ("train", "val")},
        spec=spec,
        data_dir=data.path,
        data_stage=data.stage,
        data_bytes=sum(shard["bytes"] for shard in info["shards"]),
    )


def shard_paths(data_dir: Path, split: str) -> list[str]:
    """The shard files of one split of a text dataset artifact."""
    info = json.loads((Path(data_dir) / DATASET_FILE).read_text())
    return [str(Path(data_dir) / p) for p in info["splits"][split]["shards"]]


def read_split(data_dir: Path, split: str):
    """A split as a ``ray.data.Dataset`` (read lazily).

    Raises:
        ValueError: the split has no rows (names the artifact and split).
    """
    import ray

    paths = shard_paths(data_dir, split)
    if not paths:
        raise ValueError(f"split {split!r} of {data_dir} has no rows; change split.val/test")
    return ray.data.read_parquet(paths)


def load_split(data_dir: Path, split: str):
    """A whole split as one ``pyarrow.Table``, without Ray (scoring, tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = shard_paths(data_dir, split)
    if not paths:
        raise ValueError(f"split {split!r} of {data_dir} has no rows; change split.val/test")
    return pa.concat_tables([pq.read_table(p) for p in paths])
